--[[ replen_levels: set (or clear) a position's reorder point and order-up-to level, and
re-evaluate its replenishment signal at once (replen_check in _lib.lua). Optionally sets
the position's safety stock too (a replenishment plan applying its computed safety stock);
when that leaves committed uncovered an `oversell` exception is raised (I1).

KEYS (as set_position):
  [1] pos    position hash    [2] log  position movement stream    [3] events  bucket outbox
  [4] lx     position live index   [5] res  bucket reservation parts   (the shortage rule)
  [6] stats  bucket totals (exception numbers)    [7] exc  bucket exceptions hash
  [8] sch    position dated schedule   [9] agg  the SKU's totals   [10] bq  backorder queue
  [11] rp    bucket open replenishment signals
ARGV:
  [1] cfg  JSON {max_on_hand, ev_max, actor, source, risk_max}
  [2] req  JSON {sku, loc, b (bucket), rop, out | clear (true), ss (optional safety stock),
                 why ("set" | "plan"), prio (optional, as set_position)}
Returns JSON:
  {"ok":1,"rop":N|null,"out":N|null,"signal":"raised"|"cleared"|null,"open":bool,
   "position":{…}}
  {"err":"unknown_position"} | {"err":"bad_request","field":…}
]]
--- @include "_lib"

local cfg = cjson.decode(ARGV[1])
local req = cjson.decode(ARGV[2])
if #KEYS ~= 11 then return refuse('bad_request', 'expected 11 keys') end
if not is_int(req.b, 0, 16383) then return refuse('bad_request', 'b must be the bucket number') end
if not is_text(req.sku, 64) or not is_text(req.loc, 64) then return refuse('bad_request', 'sku and location are required') end
if req.prio ~= nil and type(req.prio) ~= 'table' then return refuse('bad_request', 'prio must be a map of channel priorities') end
if req.why ~= 'set' and req.why ~= 'plan' then return refuse('bad_request', 'why must be set or plan') end
if req.clear ~= nil and req.clear ~= true then return refuse('bad_request', 'clear must be true when given') end
if not req.clear then
  if not is_int(req.rop, 0, cfg.max_on_hand) then
    return refuse('bad_request', 'reorder_point must be a whole number from 0 to ' .. cfg.max_on_hand, { field = 'reorder_point' })
  end
  if not is_int(req.out, req.rop, cfg.max_on_hand) then
    return refuse('bad_request', 'order_up_to must be a whole number from reorder_point (' .. req.rop .. ') to ' .. cfg.max_on_hand, { field = 'order_up_to' })
  end
end
if req.ss ~= nil and not is_int(req.ss, 0, cfg.max_on_hand) then
  return refuse('bad_request', 'safety_stock must be a whole number from 0 to ' .. cfg.max_on_hand, { field = 'safety_stock' })
end

local pos_key, ev_key, rp_key = KEYS[1], KEYS[3], KEYS[11]
local p = read_pos(pos_key)
if not p then return refuse('unknown_position', 'no position for ' .. req.sku .. ' at ' .. req.loc) end
local now = now_ms()
local signal = nil
if req.clear then
  local v = redis.call('HMGET', pos_key, 'rop', 'rs')
  redis.call('HDEL', pos_key, 'rop', 'out', 'rs')
  if v[1] then
    emit(cfg, ev_key, 'replenishment_levels', '', '', now, { sku = req.sku, location = req.loc,
      reorder_point = cjson.null, order_up_to = cjson.null, why = req.why })
  end
  if v[2] == '1' then
    redis.call('HDEL', rp_key, req.sku .. '|' .. req.loc)
    emit(cfg, ev_key, 'replenishment_cleared', '', '', now, { sku = req.sku, location = req.loc,
      on_hand = p.on_hand, committed = p.committed, reason = 'levels removed' })
    signal = 'cleared'
  end
else
  redis.call('HSET', pos_key, 'rop', req.rop, 'out', req.out)
  local ev = { sku = req.sku, location = req.loc, reorder_point = req.rop, order_up_to = req.out, why = req.why }
  if req.ss ~= nil and req.ss ~= p.safety_stock then
    redis.call('HSET', pos_key, 'safety_stock', req.ss)
    ev.safety_stock_before = p.safety_stock
    ev.safety_stock = req.ss
  end
  emit(cfg, ev_key, 'replenishment_levels', '', '', now, ev)
  local lk = { pos = pos_key, log = KEYS[2], lx = KEYS[4], sch = KEYS[8], agg = KEYS[9], bq = KEYS[10] }
  local bk = { res = KEYS[5], events = ev_key, stats = KEYS[6], exc = KEYS[7] }
  if req.ss ~= nil and req.ss > p.safety_stock then
    check_cover(cfg, lk, bk, req.b, req.sku, req.loc, 'safety_stock', '', now, req.prio)
  elseif req.ss ~= nil and req.ss < p.safety_stock then
    fill_backorders(cfg, lk, bk, now)  -- less held back: waiting backorders may fit
  end
  signal = replen_check(cfg, pos_key, rp_key, ev_key, req.sku, req.loc, now)
end
local v = redis.call('HMGET', pos_key, 'rop', 'out', 'rs')
return cjson.encode({ ok = 1, rop = tonumber(v[1]) or cjson.null, out = tonumber(v[2]) or cjson.null,
  signal = signal or cjson.null, open = v[3] == '1', position = pos_reply(pos_key) })
