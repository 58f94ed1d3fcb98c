--[[ explain: why is ATP what it is? Read-only. For each position asked about, the figures
reserve would decide with right now, through the same helpers (channel_atp, reclaimable):
on hand, committed by channel, safety stock, what other channels have protected and not
used, the channel's cap left, the buyer's limit left, and the holds that expire soon.
Holds already expired but not yet reclaimed are counted as reserve would count them: it
reclaims them (up to cfg.reclaim per position) before it decides.

With a requested day (`rd`), ATP is time-phased as reserve decides it (phased_points in
_lib): the least, over that day and every later point of the position's schedule, of on
hand + inbound due - commitments due - safety stock - protections. With `qty`, each item
also says the earliest day (>= today) that quantity could be promised (`promise_day`, from
the inbound schedule; absent when no day can, or when the cap or buyer limit is what
stands in the way: `promise_blocked_by`).

KEYS: per item: stats (bucket, for its rules version) | res | pos | hx | agg | sch
ARGV:
  [1] cfg  JSON {reclaim, soon (ms), list (most holds listed)}
  [2] req  JSON {rv, ch, cu (optional), brief (bool: only atp), rd (optional day),
                 qty (optional, for promise_day), pp (the channel's priority: backorders
                 waiting at it or above come first, `backorders_ahead`),
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
if req.rd ~= nil and not is_int(req.rd, 0, 1e6) then return refuse('bad_request', 'rd must be a day number') end
if req.qty ~= nil and not is_int(req.qty, 1, 1e13) then return refuse('bad_request', 'qty must be a whole number') end
if req.pp ~= nil and not is_int(req.pp, 0, 1000000) then return refuse('bad_request', 'pp must be a priority') end
if #KEYS ~= 6 * #req.items then return refuse('bad_request', 'KEYS do not match the items') end
for _, it in ipairs(req.items) do
  if not is_text(it.sku, 64) or not is_text(it.loc, 64) then return refuse('bad_request', 'each item needs a sku and a location') end
end

local now = now_ms()
local today = today_of(now)
local rd = req.rd
if rd ~= nil and rd < today then rd = today end
local out = {}
for i, it in ipairs(req.items) do
  local o = 6 * (i - 1)
  local stats, res = KEYS[o + 1], KEYS[o + 2]
  local lk = { pos = KEYS[o + 3], hx = KEYS[o + 4], agg = KEYS[o + 5], sch = KEYS[o + 6] }
  local have = bucket_rules_version(stats)
  if have ~= req.rv then return refuse('rules_stale', 'the rules changed', { have = have }) end
  local p = read_pos(lk.pos)
  if not p then
    out[i] = { exists = false }
  else
    local back, back_ch, back_cu, back_rd = reclaimable(lk, res, it.sku, it.loc, now, cfg.reclaim)
    local back_dated = 0
    for _, u in pairs(back_rd) do back_dated = back_dated + u end
    local view = { on_hand = p.on_hand, committed = p.committed - back, safety_stock = p.safety_stock,
                   inbound = p.inbound, dated = p.dated - back_dated }
    local function chc(g)
      return tonumber(redis.call('HGET', lk.pos, 'ch:' .. g) or '0') - (back_ch[g] or 0)
    end
    local _, prot = channel_atp(view, req.ch, it.pr, chc)
    local slack, base, pts = view.on_hand - view.committed, nil, nil
    if rd ~= nil or view.dated > 0 or (req.qty ~= nil and view.inbound > 0) or (not req.brief and view.inbound > 0) then
      base, pts = phased_points(lk.sch, view, today, back_rd)
      if rd ~= nil or view.dated > 0 then slack = phased_min(base, pts, rd) end
    end
    local ahead = waiting_ahead(lk.pos, p, req.pp or 0)
    local a = slack - view.safety_stock - prot - ahead
    -- limited_by: the term that sets the figure (the smallest of stock after protections,
    -- cap left and buyer limit left); 'protection' when other channels' protected units
    -- take some of what stock alone would give; 'backorders' when waiting backorders do
    local atp, limited = math.max(0, a), 'stock'
    if ahead > 0 and slack - view.safety_stock - prot > 0 then
      limited = 'backorders'
    elseif prot > 0 and slack - view.safety_stock > 0 then
      limited = 'protection'
    end
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
    local pday, blocked = nil, nil
    if req.qty ~= nil then
      if cap_left ~= nil and cap_left < req.qty then blocked = 'cap'
      elseif buyer_left ~= nil and buyer_left < req.qty then blocked = 'buyer_limit'
      else pday = promise_day(base or slack, pts or {}, today, req.qty + view.safety_stock + prot + ahead) end
    end
    if req.brief then
      out[i] = { exists = true, atp = atp, promise_day = pday, promise_blocked_by = blocked }
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
      -- the time-phased view: per day of the schedule, what is due and what a reservation
      -- for that day could still be promised
      local schedule = {}
      if pts and #pts > 0 then
        local flat = redis.call('HGETALL', lk.sch)
        local inb, dat = {}, {}
        for j = 1, #flat, 2 do
          local day, v = tonumber(flat[j]), tonumber(flat[j + 1])
          if day and v then
            if day < 0 then  -- promised for day -day
              v = v - (back_rd[-day] or 0)
              day = math.max(-day, today)
              dat[day] = (dat[day] or 0) + v
            else
              day = math.max(day, today)
              inb[day] = (inb[day] or 0) + v
            end
          end
        end
        for _, pt in ipairs(pts) do
          schedule[#schedule + 1] = { day = pt[1], inbound = inb[pt[1]] or 0, dated = dat[pt[1]] or 0,
            atp = math.max(0, phased_min(base, pts, pt[1]) - view.safety_stock - prot - ahead) }
        end
      end
      out[i] = { exists = true, atp = atp, position_atp = a, limited_by = limited,
        inbound = view.inbound, dated = view.dated, requested_day = rd, today = today,
        backorders_ahead = ahead, backordered = p.bo,
        schedule = schedule, promise_day = pday, promise_blocked_by = blocked,
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
