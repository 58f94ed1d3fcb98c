--[[ reserve_many: several reservations in one script call, one after another, each exactly
as lua/reserve.lua would take it alone (the same function, reserve_one in _reserve), each
deciding on the state the ones before it left. The auto-pipeline (atp.scripts) sends the
reserve calls of one batch this way, so the fixed cost of a script call (dispatch, the _lib
prologue, decoding cfg) is paid once per batch instead of once per reservation.

KEYS: the KEYS of each reservation (as reserve.lua), one after another
ARGV:
  [1]     cfg     JSON, as reserve.lua (one for the batch)
  [2]     counts  JSON array: how many of KEYS each reservation has, in order
  [3..]   req     JSON, one per reservation, as reserve.lua's ARGV[2]
Returns an array with one entry per reservation, in order: the reply text reserve.lua
would have returned for it alone, or, when its call raised a runtime error, the text
"!" followed by the error (the caller gets that error; the others are unaffected).
Nothing is written before the first reservation's own validation; a header that does not
match (counts against KEYS and ARGV) is an error before any write.

Each reservation runs under pcall: a runtime error in one (a bug, or a write refused by the
server) leaves behind what that one wrote before it, exactly as the same error in a lone
reserve.lua would, and the ones after it still run and answer. So every caller gets the
answer its own call would have had in that order, and a retry of a failed one replays or
conflicts by id (I3) as after a lone call.
]]
--- @include "_lib"
--- @include "_reserve"

local cfg = cjson.decode(ARGV[1])
local counts = cjson.decode(ARGV[2])
if type(counts) ~= 'table' or #counts ~= #ARGV - 2 then
  return redis.error_reply('reserve_many: counts do not match the requests')
end
local total = 0
for _, n in ipairs(counts) do
  if not is_int(n, 0, #KEYS) then return redis.error_reply('reserve_many: bad key count') end
  total = total + n
end
if total ~= #KEYS then return redis.error_reply('reserve_many: counts do not match KEYS') end

local ctx = reserve_ctx()  -- what the batch shares: the time, rules versions, reclaims
local function run(raw_req, keys)
  return reserve_one(cfg, cjson.decode(raw_req), keys, ctx)
end

local out, k = {}, 0
for i, n in ipairs(counts) do
  local keys = {}
  for j = 1, n do keys[j] = KEYS[k + j] end
  k = k + n
  local ok, reply = pcall(run, ARGV[i + 2], keys)
  if ok then
    out[i] = reply
  else
    if type(reply) == 'table' then reply = reply.err or cjson.encode(reply) end
    out[i] = '!' .. tostring(reply)
  end
end
reserve_flush(ctx)
return out
