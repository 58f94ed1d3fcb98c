--[[ rules_bump: move one bucket to a rules version, never backwards (cluster apply, and
catching up a bucket a crashed apply left behind).

KEYS: [1] stats  the bucket's stats hash (field rv)
ARGV: [1] cfg JSON {}   [2] req JSON {version}
Returns JSON: {"ok":1,"version":N} (the bucket's version now) | {"err":"bad_request"}
]]
--- @include "_lib"

local req = cjson.decode(ARGV[2])
if #KEYS ~= 1 then return refuse('bad_request', 'expected 1 key') end
if not is_int(req.version, 1, 1e15) then return refuse('bad_request', 'version must be a whole number') end
local cur = tonumber(redis.call('HGET', KEYS[1], 'rv') or '0')
if cur < req.version then
  redis.call('HSET', KEYS[1], 'rv', req.version)
  cur = req.version
end
return cjson.encode({ ok = 1, version = cur })
