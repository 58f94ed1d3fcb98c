--[[ set_position: set on_hand (and safety stock) of one position absolutely.

Creates the position when it does not exist. When the new figures no longer cover what
is committed, an `oversell` exception is raised at once (I1).

KEYS:
  [1] pos    position hash    [2] log  position movement stream    [3] events  bucket outbox
  [4] lx     position live index   [5] res  bucket reservation parts   (the shortage rule)
  [6] stats  bucket totals (exception numbers)    [7] exc  bucket exceptions hash
  [8] sch    position dated schedule (time-phased cover)
  [9] agg    the SKU's totals    [10] bq  position backorder queue (filled when supply rises)
  [11] rp     bucket open replenishment signals
ARGV:
  [1] cfg  JSON {max_on_hand, log_max, ev_max, actor, source}
  [2] req  JSON {sku, loc, b (bucket), on_hand, safety_stock (omit to keep), reason,
                 prio (optional {channel: priority}: who is at risk if it no longer covers)}
Returns JSON:
  {"ok":1,"position":{on_hand, committed, safety_stock, ch:{channel: committed}}}
  {"err":"bad_request"}
]]
--- @include "_lib"

local cfg = cjson.decode(ARGV[1])
local req = cjson.decode(ARGV[2])
if #KEYS ~= 11 then return refuse('bad_request', 'expected 11 keys') end
if not is_int(req.b, 0, 16383) then return refuse('bad_request', 'b must be the bucket number') end
if req.prio ~= nil and type(req.prio) ~= 'table' then return refuse('bad_request', 'prio must be a map of channel priorities') end
if not is_text(req.sku, 64) or not is_text(req.loc, 64) then return refuse('bad_request', 'sku and location are required') end
if not is_int(req.on_hand, 0, cfg.max_on_hand) then return refuse('bad_request', 'on_hand must be a whole number from 0 to ' .. cfg.max_on_hand) end
if req.safety_stock ~= nil and not is_int(req.safety_stock, 0, cfg.max_on_hand) then
  return refuse('bad_request', 'safety_stock must be a whole number from 0 to ' .. cfg.max_on_hand)
end
if not is_text(req.reason, 200) then return refuse('bad_request', 'reason must be 1-200 characters') end

local pos_key, log_key, ev_key = KEYS[1], KEYS[2], KEYS[3]
local lk = { pos = KEYS[1], log = KEYS[2], lx = KEYS[4], sch = KEYS[8], agg = KEYS[9], bq = KEYS[10] }
local bk = { res = KEYS[5], events = KEYS[3], stats = KEYS[6], exc = KEYS[7] }
local now = now_ms()
local p = read_pos(pos_key) or { on_hand = 0, committed = 0, safety_stock = 0, inbound = 0, dated = 0, bo = 0 }
local ss = req.safety_stock
if ss == nil then ss = p.safety_stock end
-- `sa`: when on_hand was last set absolutely; a count taken before it is superseded (count.lua)
redis.call('HSET', pos_key, 'on_hand', req.on_hand, 'committed', p.committed, 'safety_stock', ss, 'sa', now)
log_move(cfg, log_key, 'set', { reason = req.reason, ohb = p.on_hand, oha = req.on_hand,
  cmb = p.committed, cma = p.committed, at = now })
emit(cfg, ev_key, 'position_set', '', '', now, { sku = req.sku, location = req.loc,
  on_hand_before = p.on_hand, on_hand_after = req.on_hand, safety_stock = ss, reason = req.reason })
check_cover(cfg, lk, bk, req.b, req.sku, req.loc, 'set_position', '', now, req.prio)
local filled = fill_backorders(cfg, lk, bk, now)
replen_check(cfg, pos_key, KEYS[11], ev_key, req.sku, req.loc, now)
return cjson.encode({ ok = 1, position = pos_reply(pos_key), filled = filled })
