--[[ reserve: take units of one or more positions for one channel, all or nothing (I1, I4).

KEYS (walked by part_keys):
  [1]                 rix      reservation index hash of the home bucket (only when req.idx)
  then, per part p (one per bucket the lines fall in):
    res    bucket hash of reservation parts      holds  bucket zset of held parts
    events bucket outbox stream                  stats  bucket hash of unit totals
    then, per line of p:  pos  position hash | hx  position hold zset | log  position stream
ARGV:
  [1] cfg  JSON {max_qty, max_lines, max_hold, reclaim, log_max, ev_max, actor, source}
  [2] req  JSON {id, ch, hold (ms, 0 = confirmed at once), fp (request fingerprint),
                 idx (bool), home (bucket), parts:[{b, n, lines:[{sku, loc, qty}]}]}
Returns JSON:
  {"ok":1,"replay":0,"st":status,"cr":ms,"ex":ms}     accepted (the caller knows the lines)
  {"ok":1,"replay":1,"parts":[part…]}                the same request again: its parts
  {"err":"insufficient","lines":[{sku,location,requested,available}]}
  {"err":"unknown_position","lines":[{sku,location}]}
  {"err":"conflict"}                                  same id, different request
  {"err":"bad_request","detail":…}
A refusal writes nothing, except that holds found already expired on the positions
touched are reclaimed first: that reclaim is due anyway and happens before deciding.
]]
--- @include "_lib"

local cfg = cjson.decode(ARGV[1])
local req = cjson.decode(ARGV[2])

-- validate everything before the first write
if not is_text(req.id, 128) then return refuse('bad_request', 'reservation id must be 1-128 characters') end
if not is_text(req.ch, 64) then return refuse('bad_request', 'channel must be 1-64 characters') end
if not is_int(req.hold, 0, cfg.max_hold) then return refuse('bad_request', 'hold must be 0..' .. cfg.max_hold .. ' ms') end
if not is_text(req.fp, 128) then return refuse('bad_request', 'missing request fingerprint') end
local shape_err = validate_parts_shape(req, cfg.max_lines)
if shape_err then return refuse('bad_request', shape_err) end
local seen, seen_b, nlines = {}, {}, 0
for _, p in ipairs(req.parts) do
  if type(p.lines) ~= 'table' or #p.lines ~= p.n then return refuse('bad_request', 'part line count mismatch') end
  -- one part per bucket: two parts in one bucket would overwrite each other's record (I2)
  if not is_int(p.b, 0, 16383) or seen_b[p.b] then return refuse('bad_request', 'each part needs its own bucket number') end
  seen_b[p.b] = true
  for _, l in ipairs(p.lines) do
    nlines = nlines + 1
    if not is_text(l.sku, 64) or not is_text(l.loc, 64) then return refuse('bad_request', 'each line needs a sku and a location') end
    if not is_int(l.qty, 1, cfg.max_qty) then return refuse('bad_request', 'qty must be a whole number from 1 to ' .. cfg.max_qty) end
    local k = l.sku .. '|' .. l.loc
    if seen[k] then return refuse('bad_request', 'duplicate line for ' .. l.sku .. ' at ' .. l.loc) end
    seen[k] = true
  end
end
if nlines > cfg.max_lines then return refuse('bad_request', 'too many lines') end
local idx, pk = part_keys(req.idx, req.parts)
if idx == nil then return pk end

-- idempotency (I3): the same id returns the original outcome, another request conflicts
local prior = nil
if idx then
  prior = redis.call('HGET', idx, req.id)
else
  prior = redis.call('HGET', pk[1].res, req.id)
end
if prior then
  if cjson.decode(prior).fp ~= req.fp then
    return refuse('conflict', 'reservation ' .. req.id .. ' exists with a different request')
  end
  local recs = {}
  for pi, e in ipairs(pk) do
    local raw = redis.call('HGET', e.res, req.id)
    if raw then recs[#recs + 1] = cjson.decode(raw) end
  end
  return cjson.encode({ ok = 1, replay = 1, parts = recs })
end

local now = now_ms()

-- reclaim expired holds on the positions this call touches (bounded), then decide
for pi, p in ipairs(req.parts) do
  local e = pk[pi]
  for li, l in ipairs(p.lines) do
    local lk = e.lines[li]
    reclaim_expired(cfg, lk.pos, lk.hx, lk.log, e.res, e.holds, e.events, e.stats, l.sku, l.loc, now, cfg.reclaim)
  end
end

local short, unknown, on_hand = {}, {}, {}
for pi, p in ipairs(req.parts) do
  on_hand[pi] = {}
  for li, l in ipairs(p.lines) do
    local pos = read_pos(pk[pi].lines[li].pos)
    if pos then on_hand[pi][li] = pos.on_hand end
    if not pos then
      unknown[#unknown + 1] = { sku = l.sku, location = l.loc }
    else
      local avail = pos.on_hand - pos.committed - pos.safety_stock
      if l.qty > avail then
        if avail < 0 then avail = 0 end
        short[#short + 1] = { sku = l.sku, location = l.loc, requested = l.qty, available = avail }
      end
    end
  end
end
if #unknown > 0 then return refuse('unknown_position', 'no such position', { lines = unknown }) end
if #short > 0 then return refuse('insufficient', 'not enough available to promise', { lines = short }) end

-- write
local held = req.hold > 0
local ex = 0
if held then ex = now + req.hold end
local st = 'confirmed'
if held then st = 'held' end
local buckets, index_parts = {}, {}
for pi, p in ipairs(req.parts) do
  buckets[pi] = p.b
  local ls = {}
  for li, l in ipairs(p.lines) do ls[li] = { l.sku, l.loc } end
  index_parts[pi] = { b = p.b, lines = ls }
end
for pi, p in ipairs(req.parts) do
  local e = pk[pi]
  local lines, units = {}, 0
  for li, l in ipairs(p.lines) do
    units = units + l.qty
    local lk = e.lines[li]
    local after = redis.call('HINCRBY', lk.pos, 'committed', l.qty)
    redis.call('HINCRBY', lk.pos, 'ch:' .. req.ch, l.qty)
    local oh = on_hand[pi][li]
    log_move(cfg, lk.log, 'reserve', { reason = st, rid = req.id, channel = req.ch,
      ohb = oh, oha = oh, cmb = after - l.qty, cma = after, at = now })
    if held then redis.call('ZADD', lk.hx, ex, req.id) end
    lines[li] = { sku = l.sku, loc = l.loc, qty = l.qty, shipped = 0, short = 0, released = 0 }
  end
  local rec = { id = req.id, ch = req.ch, st = st, cr = now, ex = ex, up = now, fp = req.fp,
                home = req.home, parts = buckets, lines = lines, ful = {} }
  if held then stat(e.stats, units, units) else stat(e.stats, units, 0) end
  local rec_json = cjson.encode(rec)
  redis.call('HSET', e.res, req.id, rec_json)
  if held then redis.call('ZADD', e.holds, ex, req.id) end
  -- the event carries the part as stored (status, expiry, lines)
  emit(cfg, e.events, 'reserved', req.id, req.ch, now, rec_json)
end
if idx then
  redis.call('HSET', idx, req.id, cjson.encode({ fp = req.fp, ch = req.ch, cr = now, parts = index_parts }))
end
return '{"ok":1,"replay":0,"st":"' .. st .. '","cr":' .. string.format('%d', now) ..
  ',"ex":' .. string.format('%d', ex) .. '}'
