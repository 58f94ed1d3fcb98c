--[[ resolve: an operator resolves an exception (release the reservations at risk, or keep
them); the resolution is recorded on the exception and announced on the outbox (audit).

Two phases, so that a resolution is decided before anything is released:
  claim   open -> resolving (the action, note, who, when): from here no other action can
          resolve it; claiming again with the same action continues (a retry after a crash)
  finish  resolving -> resolved, with the reservations released (made in between by the
          release script, each its own audited movement), and the exception_resolved event

KEYS: [1] exc  bucket exceptions hash   [2] events  bucket outbox
ARGV:
  [1] cfg  JSON {ev_max, actor, source}
  [2] req  JSON {id, phase ("claim"|"finish"), action ("release"|"keep"), note,
                 released:[reservation id…] (finish)}
Returns JSON:
  {"ok":1,"replay":0|1,"exception":{…}}       done now, or already resolved this way
  {"err":"unknown_exception"} | {"err":"already_resolved","action":…} | {"err":"bad_request"}
]]
--- @include "_lib"

local cfg = cjson.decode(ARGV[1])
local req = cjson.decode(ARGV[2])
if #KEYS ~= 2 then return refuse('bad_request', 'expected 2 keys') end
if not is_text(req.id, 64) then return refuse('bad_request', 'exception id must be 1-64 characters') end
if req.phase ~= 'claim' and req.phase ~= 'finish' then return refuse('bad_request', 'phase must be claim or finish') end
if req.action ~= 'release' and req.action ~= 'keep' then return refuse('bad_request', 'action must be release or keep') end
if not opt_text(req.note, 1000) then return refuse('bad_request', 'note must be at most 1000 characters') end
if type(req.released) ~= 'table' then return refuse('bad_request', 'released must be a list') end
for _, rid in ipairs(req.released) do
  if not is_text(rid, 128) then return refuse('bad_request', 'released holds reservation ids') end
end
local raw = redis.call('HGET', KEYS[1], req.id)
if not raw then return refuse('unknown_exception', 'no exception with id ' .. req.id) end
local ex = cjson.decode(raw)
if ex.status ~= 'open' and ex.resolution.action ~= req.action then
  return refuse('already_resolved', 'exception ' .. req.id .. ' was resolved with ' .. ex.resolution.action,
    { action = ex.resolution.action })
end
if ex.status == 'resolved' then return cjson.encode({ ok = 1, replay = 1, exception = ex }) end
local now = now_ms()
if req.phase == 'claim' then
  if ex.status == 'open' then
    ex.status = 'resolving'
    ex.resolution = { action = req.action, note = str(req.note), by = str(cfg.actor), started_at = now }
    redis.call('HSET', KEYS[1], req.id, cjson.encode(ex))
  end
  return cjson.encode({ ok = 1, replay = 0, exception = ex })
end
if ex.status ~= 'resolving' then return refuse('bad_request', 'claim the exception before finishing it') end
ex.status = 'resolved'
ex.resolution.at = now
-- an empty Lua table would encode as {}: leave `released` out when nothing was released
if #req.released > 0 then ex.resolution.released = req.released end
redis.call('HSET', KEYS[1], req.id, cjson.encode(ex))
emit(cfg, KEYS[2], 'exception_resolved', str(ex.reservation_id), '', now,
  { id = req.id, kind = ex.kind, action = req.action, note = ex.resolution.note,
    released = ex.resolution.released })
return cjson.encode({ ok = 1, replay = 0, exception = ex })
