--[[ fulfil: ship units of a confirmed reservation, recording short picks.

Per fulfil line: `shipped` units leave on_hand and committed. `short` units (the picker
found the bin empty) leave on_hand too: they were never there. The line's remainder (not
yet shipped, the short units included: the order still wants them) stays committed, or is
released when the line says `rr` (release remainder). A later fulfilment that reports short
units again is a new observation that the system still overstates the bin; on_hand never
drops below zero.
A short pick raises a `short_pick` exception event, and an `oversell` exception when the
position no longer covers its commitments (I1); both name the reservations the shortage
rule (at_risk in _lib.lua) puts at risk to cover the shortfall. When no line has units open any more the
reservation is fulfilled. Each call is idempotent by its fulfilment id `fid`.

KEYS: as reserve (part_keys): [rix when req.idx], per part res/holds/events/stats/exc/rp, per line
      agg then pos/hx/log/lx
ARGV:
  [1] cfg  JSON {max_qty, log_max, ev_max, actor, source}
  [2] req  JSON {id, idx (bool), parts:[{b, n}], fid, ffp,
                 lines:[{sku, loc, shipped, short, rr (bool)}],
                 picked (optional: units shipped or short in the reservation's other parts,
                 when a cluster calls this part by part),
                 prio (optional: {channel: priority} of the rules, for the shortage rule)}
Returns JSON:
  {"ok":1,"replay":0|1,"parts":[part…]}      applied, or this fulfilment id already applied
  {"err":"unknown_reservation"} | {"err":"not_confirmed"} | {"err":"released"}
  {"err":"hold_expired"} | {"err":"fulfilled"} | {"err":"conflict"} (fid reused)
  {"err":"unknown_line"} | {"err":"over_fulfil"} | {"err":"negative_on_hand"}
  {"err":"bad_request"}
]]
--- @include "_lib"

local cfg = cjson.decode(ARGV[1])
local req = cjson.decode(ARGV[2])
if not is_text(req.id, 128) then return refuse('bad_request', 'reservation id must be 1-128 characters') end
if not is_text(req.fid, 128) or not is_text(req.ffp, 128) then return refuse('bad_request', 'fulfilment id must be 1-128 characters') end
local shape_err = validate_parts_shape(req, 10000)
if shape_err then return refuse('bad_request', shape_err) end
if req.prio ~= nil and type(req.prio) ~= 'table' then return refuse('bad_request', 'prio must be a map of channel priorities') end
if type(req.lines) ~= 'table' or #req.lines == 0 then return refuse('bad_request', 'lines must be a non-empty list') end
local seen = {}
for _, f in ipairs(req.lines) do
  if not is_text(f.sku, 64) or not is_text(f.loc, 64) then return refuse('bad_request', 'each line needs a sku and a location') end
  if not is_int(f.shipped, 0, cfg.max_qty) or not is_int(f.short, 0, cfg.max_qty) then
    return refuse('bad_request', 'shipped and short must be whole numbers from 0 to ' .. cfg.max_qty)
  end
  if f.shipped + f.short == 0 and not f.rr then
    return refuse('bad_request', 'line ' .. f.sku .. ' at ' .. f.loc .. ' ships nothing, reports no short pick and releases nothing')
  end
  local k = f.sku .. '|' .. f.loc
  if seen[k] then return refuse('bad_request', 'duplicate line for ' .. f.sku .. ' at ' .. f.loc) end
  seen[k] = true
end
local idx, pk = part_keys(req.idx, req.parts)
if idx == nil then return pk end
local recs, e = load_parts(req.id, pk, req.parts)
if not recs then return e end

-- replay of this fulfilment id
local prior = recs[1].ful[req.fid]
if prior then
  if prior ~= req.ffp then return refuse('conflict', 'fulfilment ' .. req.fid .. ' was applied with different lines') end
  return cjson.encode({ ok = 1, replay = 1, parts = recs })
end

local now = now_ms()
local st = logical_status(recs, now)
if st == 'held' then return refuse('not_confirmed', 'reservation ' .. req.id .. ' is held; confirm it first') end
if st == 'backordered' then
  return refuse('backordered', 'reservation ' .. req.id .. ' is backordered: nothing to ship until supply fills it')
end
if st == 'expired' then return refuse('hold_expired', 'the hold on ' .. req.id .. ' has expired') end
if st == 'released' then return refuse('released', 'reservation ' .. req.id .. ' was released') end
if st == 'fulfilled' then return refuse('fulfilled', 'reservation ' .. req.id .. ' is already fulfilled') end
if st ~= 'confirmed' then return refuse('bad_request', 'unexpected state ' .. tostring(st)) end

-- find each fulfil line in the reservation and check it fits
local plan = {}
for _, f in ipairs(req.lines) do
  local hit = nil
  for pi, rec in ipairs(recs) do
    for li, l in ipairs(rec.lines) do
      if l.sku == f.sku and l.loc == f.loc then hit = { pi = pi, li = li, l = l } end
    end
  end
  if not hit then return refuse('unknown_line', 'reservation ' .. req.id .. ' has no line for ' .. f.sku .. ' at ' .. f.loc) end
  local open = line_open(hit.l)
  if f.shipped + f.short > open then
    return refuse('over_fulfil', f.sku .. ' at ' .. f.loc .. ': shipped ' .. f.shipped .. ' + short ' .. f.short ..
      ' is more than the ' .. open .. ' units open on the line', { sku = f.sku, location = f.loc, open = open })
  end
  local key = pk[hit.pi].lines[hit.li].pos
  local oh = tonumber(redis.call('HGET', key, 'on_hand') or '0')
  if oh - f.shipped - f.short < 0 then
    return refuse('negative_on_hand', f.sku .. ' at ' .. f.loc .. ' has only ' .. oh .. ' on hand',
      { sku = f.sku, location = f.loc, on_hand = oh })
  end
  hit.f = f
  plan[#plan + 1] = hit
end

-- write
local member = {}
for pi, rec in ipairs(recs) do member[pi] = lx_member(rec) end
local shorts = {}
for _, h in ipairs(plan) do
  local rec, l, f = recs[h.pi], h.l, h.f
  local k = pk[h.pi].lines[h.li]
  local out = f.shipped + f.short
  if out > 0 then
    local oha = redis.call('HINCRBY', k.pos, 'on_hand', -out)
    local cma = commit_units(k, rec, -f.shipped)
    stat(pk[h.pi].stats, -f.shipped, 0)
    local reason = 'shipped'
    if f.short > 0 then reason = 'shipped ' .. f.shipped .. ', short pick ' .. f.short end
    log_move(cfg, k.log, 'fulfil', { reason = reason, ref = req.fid, rid = req.id, channel = rec.ch,
      ohb = oha + out, oha = oha, cmb = cma + f.shipped, cma = cma, at = now })
    l.shipped = l.shipped + f.shipped
    l.short = l.short + f.short
  end
  if f.rr then
    local rem = line_open(l)
    if rem > 0 then
      uncommit(cfg, k, rec, rem, 'release', 'remainder released at fulfilment', now)
      stat(pk[h.pi].stats, -rem, 0)
      l.released = l.released + rem
    end
  end
  if line_open(l) == 0 then redis.call('ZREM', k.lx, member[h.pi]) end
  if f.short > 0 then shorts[#shorts + 1] = h end
end
-- done when no line has units open: fulfilled if anything was picked (shipped or found
-- short), released if every line was only released
local open_total, picked = 0, 0
if is_int(req.picked, 0, 1e13) then picked = req.picked end
for _, rec in ipairs(recs) do
  for _, l in ipairs(rec.lines) do
    open_total = open_total + line_open(l)
    picked = picked + l.shipped + l.short
  end
end
local final = 'confirmed'
if open_total == 0 then
  final = 'released'
  if picked > 0 then final = 'fulfilled' end
end
for pi, rec in ipairs(recs) do
  local k = pk[pi]
  rec.ful[req.fid] = req.ffp
  rec.up = now
  local was = rec.st
  rec.st = final
  redis.call('HSET', k.res, req.id, cjson.encode(rec))
  if final ~= was then emit(cfg, k.events, final, req.id, rec.ch, now, {}) end
end
-- short picks, once the records are written (the shortage rule reads them)
for _, h in ipairs(shorts) do
  local k, f = pk[h.pi].lines[h.li], h.f
  local data = { kind = 'short_pick', sku = f.sku, location = f.loc, short = f.short,
    remainder = line_open(h.l), fulfilment = req.fid }
  local ex = uncovered(cfg, k, pk[h.pi].res, f.sku, f.loc, 'short_pick', now, req.prio)
  if ex then
    data.shortfall = ex.shortfall
    data.at_risk = ex.at_risk
  end
  local b = req.parts[h.pi].b
  raise_exception(cfg, pk[h.pi], b, req.id, recs[h.pi].ch, now, data)
  if ex then raise_exception(cfg, pk[h.pi], b, req.id, '', now, ex) end
end
for _, h in ipairs(plan) do
  emit(cfg, pk[h.pi].events, 'fulfil', req.id, recs[h.pi].ch, now, { fulfilment = req.fid,
    sku = h.f.sku, location = h.f.loc, shipped = h.f.shipped, short = h.f.short })
end
-- a remainder released gives units back: the position's backorders may fill; then the
-- replenishment signal sees the position as it is left
for _, h in ipairs(plan) do
  local k = pk[h.pi]
  if h.f.rr then fill_backorders(cfg, k.lines[h.li], k, now) end
  replen_check(cfg, k.lines[h.li].pos, k.rp, k.events, h.f.sku, h.f.loc, now)
end
return cjson.encode({ ok = 1, replay = 0, parts = recs })
