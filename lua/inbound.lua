--[[ inbound: record, amend or cancel an expected receipt (a purchase order line, an ASN)
on one position: units in transit, due on a day. They count as supply for time-phased ATP
(reservations with a requested day on or after it) and in the inventory position; they
become on hand only when received (lua/receive.lua, against the same reference).

The position keeps `inbound` (open units) and its schedule `sch` (field `<day>`: units due per
UTC day); each open receipt is a JSON record in `ib`. A receipt is never promised twice:
amending it moves its units, cancelling it removes them, and when less supply leaves
dated promises uncovered an oversell exception names the reservations at risk (I1, in its
time-phased form), as a count or a negative adjustment would.

KEYS:
  [1] pos    position hash    [2] log  position movement stream (unused; shape of receive)
  [3] events bucket outbox    [4] lx   position live index    [5] res  bucket reservation parts
  [6] stats  bucket totals    [7] exc  bucket exceptions      [8] sch  position schedule
  [9] agg    the SKU's totals (unused)    [10] bq  backorder queue (unused: backorders wait
             for the shelf, not for inbound)    [11] rp  bucket open replenishment signals
             (inbound is in the inventory position: expecting more may clear a signal, less
             raise one)    [12] ib  the position's expected receipts
  (the keys of receive.lua)
ARGV:
  [1] cfg  JSON {max_on_hand, ev_max, actor, source, risk_max}
  [2] req  JSON {op: "expect" | "amend" | "cancel", sku, loc, b (bucket), ref,
                 qty (expect: units expected; amend: units still expected, optional),
                 at (expected time, ms; amend: optional), prio (optional)}
Returns JSON:
  {"ok":1,"inbound":{ref, qty, ordered, received, at, day, cr, up} | null,
   "replay":0|1, "position":{…}, "exception":id (when one was raised)}
  {"err":"unknown_inbound"}     amend or cancel of a reference with nothing open
  {"err":"inbound_exists","inbound":{…}}   expect of an open reference, with other figures
  {"err":"bad_request"}
]]
--- @include "_lib"

local cfg = cjson.decode(ARGV[1])
local req = cjson.decode(ARGV[2])
if #KEYS ~= 12 then return refuse('bad_request', 'expected 12 keys') end
if req.op ~= 'expect' and req.op ~= 'amend' and req.op ~= 'cancel' then
  return refuse('bad_request', 'op must be expect, amend or cancel')
end
if not is_int(req.b, 0, 16383) then return refuse('bad_request', 'b must be the bucket number') end
if req.prio ~= nil and type(req.prio) ~= 'table' then return refuse('bad_request', 'prio must be a map of channel priorities') end
if not is_text(req.sku, 64) or not is_text(req.loc, 64) then return refuse('bad_request', 'sku and location are required') end
if not is_text(req.ref, 200) then return refuse('bad_request', 'reference must be 1-200 characters') end
if req.op == 'expect' or req.qty ~= nil then
  if not is_int(req.qty, 1, cfg.max_on_hand) then return refuse('bad_request', 'qty must be a whole number from 1 to ' .. cfg.max_on_hand) end
end
if req.op == 'expect' or req.at ~= nil then
  if not is_int(req.at, 0, 1e14) then return refuse('bad_request', 'at must be a time in ms') end
end
if req.op == 'amend' and req.qty == nil and req.at == nil then return refuse('bad_request', 'amend needs qty or at') end

local pos_key, ev_key, sch_key, ib_key = KEYS[1], KEYS[3], KEYS[8], KEYS[12]
local lk = { pos = KEYS[1], lx = KEYS[4], sch = KEYS[8] }
local bk = { res = KEYS[5], events = KEYS[3], stats = KEYS[6], exc = KEYS[7] }
local now = now_ms()
local raw = redis.call('HGET', ib_key, req.ref)
local ent = raw and cjson.decode(raw)
-- a closed receipt (received in full, closed short, cancelled) stays on record with
-- `st`: the same expect again is answered from it, never counted twice
local open = ent and (ent.st == nil or ent.st == 'open') or false
local p = read_pos(pos_key)

local function move(day, units)
  if units == 0 then return end
  redis.call('HINCRBY', pos_key, 'inbound', units)
  local f = string.format('%d', day)
  if redis.call('HINCRBY', sch_key, f, units) <= 0 then redis.call('HDEL', sch_key, f) end
end

local function reply(e, replay, exc_id)
  if replay == 0 then replen_check(cfg, pos_key, KEYS[11], ev_key, req.sku, req.loc, now) end
  return cjson.encode({ ok = 1, inbound = e or cjson.null, replay = replay,
    position = pos_reply(pos_key), exception = exc_id })
end

if req.op == 'expect' then
  if ent then
    if ent.ordered == req.qty and ent.at == req.at then
      if open then return reply(ent, 1) end
      return reply(nil, 1)
    end
    if not open then
      return refuse('inbound_exists', 'reference ' .. req.ref .. ' was already ' .. tostring(ent.st) .. ' here; use a new reference',
        { inbound = ent })
    end
    return refuse('inbound_exists', 'reference ' .. req.ref .. ' is already expected with other figures; amend it',
      { inbound = ent })
  end
  if p and p.inbound + req.qty > cfg.max_on_hand then return refuse('bad_request', 'inbound would exceed ' .. cfg.max_on_hand) end
  if not p then
    redis.call('HSET', pos_key, 'on_hand', 0, 'committed', 0, 'safety_stock', 0)
  end
  ent = { ref = req.ref, qty = req.qty, ordered = req.qty, received = 0, at = req.at,
          day = today_of(req.at), cr = now, up = now }
  move(ent.day, ent.qty)
  redis.call('HSET', ib_key, req.ref, cjson.encode(ent))
  emit(cfg, ev_key, 'inbound_expected', '', '', now, { sku = req.sku, location = req.loc, inbound = ent })
  return reply(ent, 0)
end

if not open then return refuse('unknown_inbound', 'no open expected receipt ' .. req.ref .. ' for ' .. req.sku .. ' at ' .. req.loc) end
local before = { qty = ent.qty, at = ent.at, day = ent.day }
local less = false
if req.op == 'cancel' then
  move(ent.day, -ent.qty)
  less = ent.qty > 0
  ent.qty = 0
  ent.up = now
  ent.st = 'cancelled'
  redis.call('HSET', ib_key, req.ref, cjson.encode(ent))
  emit(cfg, ev_key, 'inbound_cancelled', '', '', now, { sku = req.sku, location = req.loc, inbound = ent,
    before = before })
else
  local qty, at = req.qty or ent.qty, req.at or ent.at
  if p.inbound - ent.qty + qty > cfg.max_on_hand then return refuse('bad_request', 'inbound would exceed ' .. cfg.max_on_hand) end
  local day = today_of(at)
  move(ent.day, -ent.qty)
  move(day, qty)
  less = qty < ent.qty or day > ent.day
  ent.ordered = ent.received + qty
  ent.qty, ent.at, ent.day, ent.up = qty, at, day, now
  redis.call('HSET', ib_key, req.ref, cjson.encode(ent))
  emit(cfg, ev_key, 'inbound_amended', '', '', now, { sku = req.sku, location = req.loc, inbound = ent,
    before = before })
end
-- less supply, or supply later, may leave dated promises uncovered
local exc_id = nil
if less then
  local ex = check_cover(cfg, lk, bk, req.b, req.sku, req.loc, req.op == 'cancel' and 'inbound_cancelled' or 'inbound_amended', '', now, req.prio)
  if ex then exc_id = ex.id end
end
if req.op == 'cancel' then return reply(nil, 0, exc_id) end
return reply(ent, 0, exc_id)
