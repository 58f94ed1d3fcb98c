--[[ replen_config: store (or remove) one SKU's replenishment planning settings, read by
the plan (atp.replenishment): service level, lead time, review period, history window.
The Python core validates them; this script checks their shape again before writing.

KEYS:
  [1] rpc    bucket hash: SKU -> JSON of its settings
ARGV:
  [1] cfg  JSON {actor, source}
  [2] req  JSON {sku, settings: {service_level, lead_time_days, review_days, window_days}
                 | remove (true)}
Returns JSON:
  {"ok":1,"removed":0|1}   or   {"ok":1,"settings":{…, updated_at, actor}}
  {"err":"bad_request"}
]]
--- @include "_lib"

local cfg = cjson.decode(ARGV[1])
local req = cjson.decode(ARGV[2])
if #KEYS ~= 1 then return refuse('bad_request', 'expected 1 key') end
if not is_text(req.sku, 64) then return refuse('bad_request', 'sku is required') end
if req.remove == true then
  return cjson.encode({ ok = 1, removed = redis.call('HDEL', KEYS[1], req.sku) })
end
local s = req.settings
if type(s) ~= 'table' then return refuse('bad_request', 'settings must be an object') end
if type(s.service_level) ~= 'number' or s.service_level <= 0 or s.service_level >= 1 then
  return refuse('bad_request', 'service_level must be between 0 and 1 (exclusive)')
end
if type(s.lead_time_days) ~= 'number' or s.lead_time_days <= 0 or s.lead_time_days > 3650 then
  return refuse('bad_request', 'lead_time_days must be more than 0 and at most 3650')
end
if type(s.review_days) ~= 'number' or s.review_days < 0 or s.review_days > 3650 then
  return refuse('bad_request', 'review_days must be from 0 to 3650')
end
if not is_int(s.window_days, 2, HISTORY_DAYS) then
  return refuse('bad_request', 'window_days must be a whole number from 2 to ' .. HISTORY_DAYS)
end
local out = { service_level = s.service_level, lead_time_days = s.lead_time_days,
  review_days = s.review_days, window_days = s.window_days, updated_at = now_ms(),
  actor = str(cfg.actor) }
redis.call('HSET', KEYS[1], req.sku, cjson.encode(out))
return cjson.encode({ ok = 1, settings = out })
