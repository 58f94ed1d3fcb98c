--[[ adjust: change on_hand of an existing position by a signed delta, with a reason.

On_hand never goes below zero. When a negative adjustment leaves committed uncovered, an
`oversell` exception is raised at once (I1).

KEYS:
  [1] pos    position hash    [2] log  position movement stream    [3] events  bucket outbox
  [4] lx     position live index   [5] res  bucket reservation parts   (the shortage rule)
  [6] stats  bucket totals (exception numbers)    [7] exc  bucket exceptions hash
  [8] sch    position dated schedule (time-phased cover)
  [9] agg    the SKU's totals    [10] bq  position backorder queue (filled when supply rises)
  [11] rp     bucket open replenishment signals
ARGV:
  [1] cfg  JSON {max_on_hand, log_max, ev_max, actor, source}
  [2] req  JSON {sku, loc, b (bucket), delta, reason, ref, prio (optional, as set_position)}
Returns JSON:
  {"ok":1,"position":{…}}
  {"err":"unknown_position"} | {"err":"negative_on_hand","on_hand":N} | {"err":"bad_request"}
]]
--- @include "_lib"

local cfg = cjson.decode(ARGV[1])
local req = cjson.decode(ARGV[2])
if #KEYS ~= 11 then return refuse('bad_request', 'expected 11 keys') end
if not is_int(req.b, 0, 16383) then return refuse('bad_request', 'b must be the bucket number') end
if req.prio ~= nil and type(req.prio) ~= 'table' then return refuse('bad_request', 'prio must be a map of channel priorities') end
if not is_text(req.sku, 64) or not is_text(req.loc, 64) then return refuse('bad_request', 'sku and location are required') end
if not is_int(req.delta, -cfg.max_on_hand, cfg.max_on_hand) or req.delta == 0 then
  return refuse('bad_request', 'delta must be a non-zero whole number within ±' .. cfg.max_on_hand)
end
if not is_text(req.reason, 200) then return refuse('bad_request', 'reason must be 1-200 characters') end
if not opt_text(req.ref, 200) then return refuse('bad_request', 'ref must be at most 200 characters') end

local pos_key, log_key, ev_key = KEYS[1], KEYS[2], KEYS[3]
local lk = { pos = KEYS[1], log = KEYS[2], lx = KEYS[4], sch = KEYS[8], agg = KEYS[9], bq = KEYS[10] }
local bk = { res = KEYS[5], events = KEYS[3], stats = KEYS[6], exc = KEYS[7] }
local p = read_pos(pos_key)
if not p then return refuse('unknown_position', 'no position for ' .. req.sku .. ' at ' .. req.loc) end
local after = p.on_hand + req.delta
if after < 0 then
  return refuse('negative_on_hand', 'on_hand ' .. p.on_hand .. ' cannot drop by ' .. -req.delta, { on_hand = p.on_hand })
end
if after > cfg.max_on_hand then return refuse('bad_request', 'on_hand would exceed ' .. cfg.max_on_hand) end
local now = now_ms()
redis.call('HINCRBY', pos_key, 'on_hand', req.delta)
log_move(cfg, log_key, 'adjust', { reason = req.reason, ref = req.ref, ohb = p.on_hand, oha = after,
  cmb = p.committed, cma = p.committed, at = now })
emit(cfg, ev_key, 'adjusted', '', '', now, { sku = req.sku, location = req.loc, delta = req.delta,
  on_hand_before = p.on_hand, on_hand_after = after, reason = req.reason })
if req.delta < 0 then check_cover(cfg, lk, bk, req.b, req.sku, req.loc, 'adjust', '', now, req.prio) end
local filled = {}
if req.delta > 0 then filled = fill_backorders(cfg, lk, bk, now) end
replen_check(cfg, pos_key, KEYS[11], ev_key, req.sku, req.loc, now)
return cjson.encode({ ok = 1, position = pos_reply(pos_key), filled = filled })
