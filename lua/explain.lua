--[[ explain: why is ATP what it is? Read-only. For each position asked about, the figures
reserve would decide with right now, through the same helpers (channel_atp, reclaimable):
on hand, committed by channel, safety stock, what other channels have protected and not
used, the channel's cap left, the buyer's limit left, and the holds that expire soon.
Holds already expired but not yet reclaimed are counted as reserve would count them: it
reclaims them (up to cfg.reclaim per position) before it decides.

KEYS: per item: stats (bucket, for its rules version) | res | pos | hx | agg
ARGV:
  [1] cfg  JSON {reclaim, soon (ms), list (most holds listed)}
  [2] req  JSON {rv, ch, cu (optional), brief (bool: only atp),
                 items:[{sku, loc, pr:[ [channel, protected]… ] (optional), cap (optional),
                         bl (optional)}]}
Returns JSON:
  {"ok":1,"now":ms,"items":[{exists:false} | {exists:true, atp, …breakdown}]}
  {"err":"rules_stale","have":N} | {"err":"bad_request"}
]]
--- @include "_lib"

local cfg = cjson.decode(ARGV[1])
local req = cjson.decode(ARGV[2])
if not is_int(req.rv, 0, 1e15) then return refuse('bad_request', 'rv must be a rules version') end
if not is_text(req.ch, 64) then return refuse('bad_request', 'channel must be 1-64 characters') end
if req.cu ~= nil and not is_text(req.cu, 128) then return refuse('bad_request', 'customer id must be 1-128 characters') end
if type(req.items) ~= 'table' then return refuse('bad_request', 'items must be a list') end
if #KEYS ~= 5 * #req.items then return refuse('bad_request', 'KEYS do not match the items') end
for _, it in ipairs(req.items) do
  if not is_text(it.sku, 64) or not is_text(it.loc, 64) then return refuse('bad_request', 'each item needs a sku and a location') end
end

local now = now_ms()
local out = {}
for i, it in ipairs(req.items) do
  local o = 5 * (i - 1)
  local stats, res = KEYS[o + 1], KEYS[o + 2]
  local lk = { pos = KEYS[o + 3], hx = KEYS[o + 4], agg = KEYS[o + 5] }
  local have = bucket_rules_version(stats)
  if have ~= req.rv then return refuse('rules_stale', 'the rules changed', { have = have }) end
  local p = read_pos(lk.pos)
  if not p then
    out[i] = { exists = false }
  else
    local back, back_ch, back_cu = reclaimable(lk, res, it.sku, it.loc, now, cfg.reclaim)
    local view = { on_hand = p.on_hand, committed = p.committed - back, safety_stock = p.safety_stock }
    local function chc(g)
      return tonumber(redis.call('HGET', lk.pos, 'ch:' .. g) or '0') - (back_ch[g] or 0)
    end
    local a, prot = channel_atp(view, req.ch, it.pr, chc)
    -- limited_by: the term that sets the figure (the smallest of stock after protections,
    -- cap left and buyer limit left); 'protection' when other channels' protected units
    -- take some of what stock alone would give
    local atp, limited = math.max(0, a), 'stock'
    if prot > 0 and view.on_hand - view.committed - view.safety_stock > 0 then limited = 'protection' end
    local cap_used, cap_left, buyer_used, buyer_left = nil, nil, nil, nil
    if it.cap ~= nil then
      cap_used = tonumber(redis.call('HGET', lk.agg, 'ch:' .. req.ch) or '0') - (back_ch[req.ch] or 0)
      cap_left = math.max(0, it.cap - cap_used)
      if cap_left < atp then atp = cap_left; limited = 'cap' end
    end
    if it.bl ~= nil and req.cu ~= nil then
      buyer_used = tonumber(redis.call('HGET', lk.agg, 'cu:' .. req.cu) or '0') - (back_cu[req.cu] or 0)
      buyer_left = math.max(0, it.bl - buyer_used)
      if buyer_left < atp then atp = buyer_left; limited = 'buyer_limit' end
    end
    if req.brief then
      out[i] = { exists = true, atp = atp }
    else
      local by_ch, protected = {}, {}
      local flat = redis.call('HGETALL', lk.pos)
      for j = 1, #flat, 2 do
        if string.sub(flat[j], 1, 3) == 'ch:' then
          local g = string.sub(flat[j], 4)
          local v = tonumber(flat[j + 1]) - (back_ch[g] or 0)
          if v ~= 0 then by_ch[g] = v end
        end
      end
      for _, gp in ipairs(it.pr or {}) do
        if gp[1] ~= req.ch then
          local left = gp[2] - chc(gp[1])
          if left > 0 then protected[gp[1]] = left end
        end
      end
      local soon_ids = redis.call('ZRANGEBYSCORE', lk.hx, '(' .. now, now + cfg.soon, 'WITHSCORES', 'LIMIT', 0, cfg.list)
      local soon, soon_units = {}, 0
      for j = 1, #soon_ids, 2 do
        local raw = redis.call('HGET', res, soon_ids[j])
        if raw then
          local part = cjson.decode(raw)
          for _, l in ipairs(part.lines) do
            if l.sku == it.sku and l.loc == it.loc and line_open(l) > 0 then
              soon[#soon + 1] = { reservation_id = part.id, channel = part.ch, qty = line_open(l),
                                  expires_at = tonumber(soon_ids[j + 1]) }
              soon_units = soon_units + line_open(l)
            end
          end
        end
      end
      out[i] = { exists = true, atp = atp, position_atp = a, limited_by = limited,
        on_hand = view.on_hand, committed = view.committed, committed_by_channel = by_ch,
        safety_stock = view.safety_stock, expired_holds_reclaimable = back,
        protected_for_others = protected, protected_for_others_total = prot,
        cap = it.cap, cap_used = cap_used, cap_left = cap_left,
        buyer_limit = it.bl, buyer_used = buyer_used, buyer_left = buyer_left,
        holds_expiring_soon = { window_ms = cfg.soon,
          count = redis.call('ZCOUNT', lk.hx, '(' .. now, now + cfg.soon),
          listed_units = soon_units, holds = soon } }
    end
  end
end
return cjson.encode({ ok = 1, now = now, items = out })
