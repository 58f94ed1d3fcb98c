--[[ receive: inbound units arrive at a position (on_hand up), against a reference.

Creates the position when it does not exist (a first receipt). When the reference is an
open expected receipt of the position (lua/inbound.lua), the units received come off what
is still expected (never below zero: an over-receipt adds to on hand all the same), and
the receipt closes when nothing more is expected or when `close` says the rest will not
come (a short shipment). Closing a short receipt takes its remaining units out of the
schedule; when that leaves dated promises uncovered an oversell exception is raised (I1).

KEYS:
  [1] pos    position hash    [2] log  position movement stream    [3] events  bucket outbox
  [4] lx     position live index   [5] res  bucket reservation parts   [6] stats  bucket totals
  [7] exc    bucket exceptions     [8] sch  position schedule     [9] agg  the SKU's totals
  [10] bq    position backorder queue (filled from what arrives)
  [11] rp    bucket open replenishment signals    [12] ib  expected receipts
  (those of set_position, then ib)
ARGV:
  [1] cfg  JSON {max_on_hand, log_max, ev_max, actor, source}
  [2] req  JSON {sku, loc, b (bucket), qty, ref, close (bool, optional), prio (optional)}
Returns JSON:
  {"ok":1,"position":{…},"inbound":{…} | null (the expected receipt after it, when it matched),
   "exception":id (when one was raised)}
  {"err":"unknown_inbound"}    close asked for a reference with nothing open
  {"err":"bad_request"}
]]
--- @include "_lib"

local cfg = cjson.decode(ARGV[1])
local req = cjson.decode(ARGV[2])
if #KEYS ~= 12 then return refuse('bad_request', 'expected 12 keys') end
if not is_int(req.b, 0, 16383) then return refuse('bad_request', 'b must be the bucket number') end
if req.prio ~= nil and type(req.prio) ~= 'table' then return refuse('bad_request', 'prio must be a map of channel priorities') end
if not is_text(req.sku, 64) or not is_text(req.loc, 64) then return refuse('bad_request', 'sku and location are required') end
if not is_int(req.qty, 1, cfg.max_on_hand) then return refuse('bad_request', 'qty must be a whole number from 1 to ' .. cfg.max_on_hand) end
if not is_text(req.ref, 200) then return refuse('bad_request', 'reference must be 1-200 characters') end
if req.close ~= nil and type(req.close) ~= 'boolean' then return refuse('bad_request', 'close must be true or false') end

local pos_key, log_key, ev_key, sch_key, ib_key = KEYS[1], KEYS[2], KEYS[3], KEYS[8], KEYS[12]
local lk = { pos = KEYS[1], log = KEYS[2], lx = KEYS[4], sch = KEYS[8], agg = KEYS[9], bq = KEYS[10] }
local bk = { res = KEYS[5], events = KEYS[3], stats = KEYS[6], exc = KEYS[7] }
local raw = redis.call('HGET', ib_key, req.ref)
if raw then
  local st = cjson.decode(raw).st
  if st ~= nil and st ~= 'open' then raw = nil end  -- closed: a receipt against it is a plain one
end
if req.close and not raw then
  return refuse('unknown_inbound', 'no open expected receipt ' .. req.ref .. ' for ' .. req.sku .. ' at ' .. req.loc)
end
local p = read_pos(pos_key) or { on_hand = 0, committed = 0, safety_stock = 0, inbound = 0, dated = 0, bo = 0 }
local after = p.on_hand + req.qty
if after > cfg.max_on_hand then return refuse('bad_request', 'on_hand would exceed ' .. cfg.max_on_hand) end
local now = now_ms()

local ent, cut = nil, 0
if raw then
  ent = cjson.decode(raw)
  local take = math.min(req.qty, ent.qty)
  cut = ent.qty - take
  if cut > 0 and not req.close then cut = 0 end
  local off = take + cut   -- leaves the schedule: received, or will not come
  redis.call('HINCRBY', pos_key, 'inbound', -off)
  local f = string.format('%d', ent.day)
  if redis.call('HINCRBY', sch_key, f, -off) <= 0 then redis.call('HDEL', sch_key, f) end
  ent.qty = ent.qty - off
  ent.received = ent.received + req.qty
  ent.up = now
  if ent.qty == 0 then ent.st = 'closed' end  -- kept on record: a retried expect is a replay
  redis.call('HSET', ib_key, req.ref, cjson.encode(ent))
end
redis.call('HSET', pos_key, 'on_hand', after, 'committed', p.committed, 'safety_stock', p.safety_stock)
log_move(cfg, log_key, 'receive', { reason = 'receipt', ref = req.ref, ohb = p.on_hand, oha = after,
  cmb = p.committed, cma = p.committed, at = now })
local ev = { sku = req.sku, location = req.loc, qty = req.qty, reference = req.ref,
  on_hand_before = p.on_hand, on_hand_after = after }
if ent then
  ev.inbound = ent
  ev.closed = ent.qty == 0
  ev.short_closed = cut
end
emit(cfg, ev_key, 'received', '', '', now, ev)
local exc_id = nil
if cut > 0 then
  local ex = check_cover(cfg, lk, bk, req.b, req.sku, req.loc, 'inbound_short', '', now, req.prio)
  if ex then exc_id = ex.id end
end
local filled = fill_backorders(cfg, lk, bk, now)
replen_check(cfg, pos_key, KEYS[11], ev_key, req.sku, req.loc, now)
return cjson.encode({ ok = 1, position = pos_reply(pos_key), inbound = ent or cjson.null, exception = exc_id,
  filled = filled })
