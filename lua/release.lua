--[[ release: a held or confirmed reservation gives its open units back, and they fill the
positions' waiting backorders (fill_backorders). Releasing a backorder cancels it: it
leaves its position's queue (it held no units).

KEYS: as reserve (part_keys): [rix when req.idx], per part res/holds/events/stats/exc/rp, per line
      agg then pos/hx/log/lx/sch/bq
ARGV:
  [1] cfg  JSON {log_max, ev_max, actor, source}
  [2] req  JSON {id, idx (bool), reason, parts:[{b, n}], rollback (bool)}
     rollback: undo a reservation part taken moments ago by a multi-slot reserve on a
     cluster whose other part was refused (I4): its units return and the part is deleted,
     as if never taken (the movements stay in the log). Missing parts are skipped.
Returns JSON:
  {"ok":1,"rolled_back":N}                 with rollback
  {"ok":1,"replay":0|1,"parts":[part…]}   released now; or already released or expired
                                          (then any units an expired hold still had are
                                          reclaimed, as they would be anyway)
  {"err":"unknown_reservation"} | {"err":"fulfilled"} | {"err":"bad_request"}
]]
--- @include "_lib"

local cfg = cjson.decode(ARGV[1])
local req = cjson.decode(ARGV[2])
if not is_text(req.id, 128) then return refuse('bad_request', 'reservation id must be 1-128 characters') end
if not opt_text(req.reason, 200) then return refuse('bad_request', 'reason must be at most 200 characters') end
local shape_err = validate_parts_shape(req, 10000)
if shape_err then return refuse('bad_request', shape_err) end
local idx, pk = part_keys(req.idx, req.parts)
if idx == nil then return pk end

if req.rollback then
  local recs, n = {}, 0
  for pi, k in ipairs(pk) do
    local raw = redis.call('HGET', k.res, req.id)
    if raw then
      local rec = cjson.decode(raw)
      if #rec.lines ~= req.parts[pi].n then return refuse('bad_request', 'line keys do not match reservation ' .. req.id) end
      if (rec.st ~= 'held' and rec.st ~= 'confirmed') or next(rec.ful) ~= nil then
        return refuse('bad_request', 'only an untouched reservation part can be rolled back')
      end
      recs[pi] = rec
    end
  end
  local now = now_ms()
  for pi, k in ipairs(pk) do
    local rec = recs[pi]
    if rec then
      for li, l in ipairs(rec.lines) do
        local open = line_open(l)
        if open > 0 then
          uncommit(cfg, k.lines[li], rec, open, 'rollback', 'reservation rolled back', now)
          if rec.st == 'held' then stat(k.stats, -open, -open) else stat(k.stats, -open, 0) end
        end
        redis.call('ZREM', k.lines[li].hx, req.id)
        redis.call('ZREM', k.lines[li].lx, lx_member(rec))
      end
      redis.call('ZREM', k.holds, req.id)
      redis.call('HDEL', k.res, req.id)
      for li in ipairs(rec.lines) do fill_backorders(cfg, k.lines[li], k, now) end
      emit(cfg, k.events, 'rolled_back', req.id, rec.ch, now, { reason = 'another part of the reservation was refused' })
      for li, l in ipairs(rec.lines) do replen_check(cfg, k.lines[li].pos, k.rp, k.events, l.sku, l.loc, now) end
      n = n + 1
    end
  end
  return cjson.encode({ ok = 1, rolled_back = n })
end

local recs, e = load_parts(req.id, pk, req.parts)
if not recs then return e end

local now = now_ms()
local st = logical_status(recs, now)
if st == 'released' then return cjson.encode({ ok = 1, replay = 1, parts = recs }) end
if st == 'fulfilled' then return refuse('fulfilled', 'reservation ' .. req.id .. ' was fulfilled') end
if st == 'backordered' then
  -- a backorder is cancelled: it leaves the queue (it held no units)
  for pi, rec in ipairs(recs) do
    local k = pk[pi]
    bo_dequeue(k.lines[1], rec)
    rec.lines[1].released = rec.lines[1].qty
    rec.st = 'released'
    rec.up = now
    rec.rsn = req.reason or 'released'
    redis.call('HSET', k.res, req.id, cjson.encode(rec))
    emit(cfg, k.events, 'released', req.id, rec.ch, now, { reason = rec.rsn, backorder = true })
    -- those behind it may now fit
    fill_backorders(cfg, k.lines[1], k, now)
    replen_check(cfg, k.lines[1].pos, k.rp, k.events, rec.lines[1].sku, rec.lines[1].loc, now)
  end
  return cjson.encode({ ok = 1, replay = 0, parts = recs })
end
if st ~= 'held' and st ~= 'confirmed' and st ~= 'expired' then
  return refuse('bad_request', 'unexpected state ' .. tostring(st))
end

local kind, reason, final = 'release', req.reason or 'released', 'released'
if st == 'expired' then kind, reason, final = 'expire', 'hold expired', 'expired' end
for pi, rec in ipairs(recs) do
  local k = pk[pi]
  local changed = false
  for li, l in ipairs(rec.lines) do
    local open = line_open(l)
    if open > 0 then
      uncommit(cfg, k.lines[li], rec, open, kind, reason, now)
      -- held units: of a part on hold, or of an expired one not yet reclaimed
      if rec.st == 'held' or rec.st == 'expired' then stat(k.stats, -open, -open) else stat(k.stats, -open, 0) end
      l.released = l.released + open
      changed = true
    end
    redis.call('ZREM', k.lines[li].hx, req.id)
    redis.call('ZREM', k.lines[li].lx, lx_member(rec))
  end
  redis.call('ZREM', k.holds, req.id)
  if rec.st ~= final or changed then
    local was = rec.st
    rec.st = final
    rec.up = now
    -- why it was released, kept on the part (an exception's resolution looks for its own)
    if was ~= final and final == 'released' then rec.rsn = reason end
    redis.call('HSET', k.res, req.id, cjson.encode(rec))
    if was ~= final then emit(cfg, k.events, final, req.id, rec.ch, now, { reason = reason }) end
  end
  if changed then
    for li, l in ipairs(rec.lines) do
      fill_backorders(cfg, k.lines[li], k, now)
      replen_check(cfg, k.lines[li].pos, k.rp, k.events, l.sku, l.loc, now)
    end
  end
end
local replay = 0
if st == 'expired' then replay = 1 end
return cjson.encode({ ok = 1, replay = replay, parts = recs })
