--[[ confirm: a held reservation becomes confirmed; its expiry is dropped.

KEYS: as reserve (part_keys): [rix when req.idx], per part res/holds/events/stats/exc/rp, per line
      agg then pos/hx/log/lx/sch/bq
ARGV:
  [1] cfg  JSON {log_max, ev_max, actor, source}
  [2] req  JSON {id, idx (bool), parts:[{b, n}]}
Returns JSON:
  {"ok":1,"replay":0|1,"parts":[part…]}     confirmed now, or already confirmed (no-op)
  {"err":"unknown_reservation"} | {"err":"hold_expired"} | {"err":"released"}
  {"err":"fulfilled"} | {"err":"bad_request"}
]]
--- @include "_lib"

local cfg = cjson.decode(ARGV[1])
local req = cjson.decode(ARGV[2])
if not is_text(req.id, 128) then return refuse('bad_request', 'reservation id must be 1-128 characters') end
local shape_err = validate_parts_shape(req, 10000)
if shape_err then return refuse('bad_request', shape_err) end
local idx, pk = part_keys(req.idx, req.parts)
if idx == nil then return pk end
local recs, e = load_parts(req.id, pk, req.parts)
if not recs then return e end

local now = now_ms()
local st = logical_status(recs, now)
if st == 'confirmed' then return cjson.encode({ ok = 1, replay = 1, parts = recs }) end
if st == 'expired' then return refuse('hold_expired', 'the hold on ' .. req.id .. ' has expired') end
if st == 'released' then return refuse('released', 'reservation ' .. req.id .. ' was released') end
if st == 'fulfilled' then return refuse('fulfilled', 'reservation ' .. req.id .. ' was fulfilled') end
if st == 'backordered' then
  return refuse('backordered', 'reservation ' .. req.id .. ' is backordered: it is confirmed when supply fills it')
end
if st ~= 'held' then return refuse('bad_request', 'unexpected state ' .. tostring(st)) end

for pi, rec in ipairs(recs) do
  local k = pk[pi]
  local open = 0
  for _, l in ipairs(rec.lines) do open = open + line_open(l) end
  stat(k.stats, 0, -open)
  local was = lx_member(rec)
  rec.st = 'confirmed'
  rec.ex = 0
  rec.cf = now
  rec.up = now
  local now_member = lx_member(rec)
  for li, l in ipairs(rec.lines) do
    redis.call('ZREM', k.lines[li].hx, req.id)
    -- the live index orders holds before confirmed reservations (at_risk)
    if line_open(l) > 0 then
      redis.call('ZREM', k.lines[li].lx, was)
      redis.call('ZADD', k.lines[li].lx, 0, now_member)
    end
  end
  redis.call('ZREM', k.holds, req.id)
  redis.call('HSET', k.res, req.id, cjson.encode(rec))
  emit(cfg, k.events, 'confirmed', req.id, rec.ch, now, {})
end
return cjson.encode({ ok = 1, replay = 0, parts = recs })
