--[[ receive: inbound units arrive at a position (on_hand up), against a reference.

Creates the position when it does not exist (a first receipt).

KEYS:
  [1] pos    position hash    [2] log  position movement stream    [3] events  bucket outbox
  [4] rp     bucket open replenishment signals
ARGV:
  [1] cfg  JSON {max_on_hand, log_max, ev_max, actor, source}
  [2] req  JSON {sku, loc, qty, ref}
Returns JSON:
  {"ok":1,"position":{…}}
  {"err":"bad_request"}
]]
--- @include "_lib"

local cfg = cjson.decode(ARGV[1])
local req = cjson.decode(ARGV[2])
if #KEYS ~= 4 then return refuse('bad_request', 'expected 4 keys') end
if not is_text(req.sku, 64) or not is_text(req.loc, 64) then return refuse('bad_request', 'sku and location are required') end
if not is_int(req.qty, 1, cfg.max_on_hand) then return refuse('bad_request', 'qty must be a whole number from 1 to ' .. cfg.max_on_hand) end
if not is_text(req.ref, 200) then return refuse('bad_request', 'reference must be 1-200 characters') end

local pos_key, log_key, ev_key = KEYS[1], KEYS[2], KEYS[3]
local p = read_pos(pos_key) or { on_hand = 0, committed = 0, safety_stock = 0 }
local after = p.on_hand + req.qty
if after > cfg.max_on_hand then return refuse('bad_request', 'on_hand would exceed ' .. cfg.max_on_hand) end
local now = now_ms()
redis.call('HSET', pos_key, 'on_hand', after, 'committed', p.committed, 'safety_stock', p.safety_stock)
log_move(cfg, log_key, 'receive', { reason = 'receipt', ref = req.ref, ohb = p.on_hand, oha = after,
  cmb = p.committed, cma = p.committed, at = now })
emit(cfg, ev_key, 'received', '', '', now, { sku = req.sku, location = req.loc, qty = req.qty,
  reference = req.ref, on_hand_before = p.on_hand, on_hand_after = after })
replen_check(cfg, pos_key, KEYS[4], ev_key, req.sku, req.loc, now)
return cjson.encode({ ok = 1, position = pos_reply(pos_key) })
