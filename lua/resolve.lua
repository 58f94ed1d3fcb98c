--[[ resolve: an operator resolves an exception (release the reservations at risk, or keep
them); the resolution is recorded on the exception and announced on the outbox (audit).
The releases themselves are made before, by the release script (their own movements).

KEYS: [1] exc  bucket exceptions hash   [2] events  bucket outbox
ARGV:
  [1] cfg  JSON {ev_max, actor, source}
  [2] req  JSON {id, action ("release"|"keep"), note, released:[reservation id…]}
Returns JSON:
  {"ok":1,"replay":0|1,"exception":{…}}       resolved now, or already resolved this way
  {"err":"unknown_exception"} | {"err":"already_resolved","action":…} | {"err":"bad_request"}
]]
--- @include "_lib"

local cfg = cjson.decode(ARGV[1])
local req = cjson.decode(ARGV[2])
if #KEYS ~= 2 then return refuse('bad_request', 'expected 2 keys') end
if not is_text(req.id, 64) then return refuse('bad_request', 'exception id must be 1-64 characters') end
if req.action ~= 'release' and req.action ~= 'keep' then return refuse('bad_request', 'action must be release or keep') end
if not opt_text(req.note, 1000) then return refuse('bad_request', 'note must be at most 1000 characters') end
if type(req.released) ~= 'table' then return refuse('bad_request', 'released must be a list') end
for _, rid in ipairs(req.released) do
  if not is_text(rid, 128) then return refuse('bad_request', 'released holds reservation ids') end
end
local raw = redis.call('HGET', KEYS[1], req.id)
if not raw then return refuse('unknown_exception', 'no exception with id ' .. req.id) end
local ex = cjson.decode(raw)
if ex.status == 'resolved' then
  if ex.resolution.action == req.action then return cjson.encode({ ok = 1, replay = 1, exception = ex }) end
  return refuse('already_resolved', 'exception ' .. req.id .. ' was resolved with ' .. ex.resolution.action,
    { action = ex.resolution.action })
end
local now = now_ms()
ex.status = 'resolved'
ex.resolution = { action = req.action, note = str(req.note), by = str(cfg.actor), at = now,
                  released = req.released }
if #req.released == 0 then ex.resolution.released = nil end
redis.call('HSET', KEYS[1], req.id, cjson.encode(ex))
emit(cfg, KEYS[2], 'exception_resolved', str(ex.reservation_id), '', now,
  { id = req.id, kind = ex.kind, action = req.action, note = str(req.note), released = req.released })
return cjson.encode({ ok = 1, replay = 0, exception = ex })
