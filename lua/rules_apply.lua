--[[ rules_apply: store a new version of the allocation rules document and make every
bucket enforce it, in one atomic step on one server (atp.rules). On a cluster the buckets
live on other nodes: this script is then called with the two document keys only, and each
bucket is moved to the new version by rules_bump (a reserve that meets a bucket still on
the old version makes it catch up, so a half-finished apply finishes by itself).

KEYS:
  [1] doc      hash {version, doc (JSON), at (ms), actor}
  [2] history  hash version -> JSON {doc, at, actor} (the last cfg.keep versions)
  [3..]        stats hash of every bucket (field rv), on one server
ARGV:
  [1] cfg  JSON {keep}
  [2] req  JSON {doc (JSON text), expect (version the caller saw, or -1), actor}
Returns JSON:
  {"ok":1,"version":N,"at":ms}
  {"err":"version_conflict","version":N}     expect given and the stored version differs
  {"err":"bad_request"}
]]
--- @include "_lib"

local cfg = cjson.decode(ARGV[1])
local req = cjson.decode(ARGV[2])
if #KEYS < 2 then return refuse('bad_request', 'expected the document keys') end
if not is_text(req.doc, 16777216) then return refuse('bad_request', 'doc must be JSON text') end
if not is_int(req.expect, -1, 1e15) then return refuse('bad_request', 'expect must be a version or -1') end
if not opt_text(req.actor, 128) then return refuse('bad_request', 'actor must be at most 128 characters') end
if not is_int(cfg.keep, 1, 100000) then return refuse('bad_request', 'keep must be a whole number') end
local ok = pcall(cjson.decode, req.doc)
if not ok then return refuse('bad_request', 'doc is not JSON') end

local cur = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if req.expect >= 0 and req.expect ~= cur then
  return refuse('version_conflict', 'the rules are at version ' .. cur, { version = cur })
end
local v = cur + 1
local now = now_ms()
redis.call('HSET', KEYS[1], 'version', v, 'doc', req.doc, 'at', now, 'actor', str(req.actor))
redis.call('HSET', KEYS[2], v, cjson.encode({ doc = req.doc, at = now, actor = str(req.actor) }))
if v - cfg.keep >= 1 then redis.call('HDEL', KEYS[2], v - cfg.keep) end
for i = 3, #KEYS do redis.call('HSET', KEYS[i], 'rv', v) end
return cjson.encode({ ok = 1, version = v, at = now })
