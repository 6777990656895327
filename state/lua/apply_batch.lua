-- apply_batch.lua: apply one batch of one partition's records to the customers' RFM state,
-- atomically, in offset order, together with the partition's last applied offset.
-- The twin of state.rfm.apply_batch (a differential test demands identical state).
--
-- KEYS[1]  meta hash of the partition    (fields: offset, wm)
-- KEYS[2]  z:last  KEYS[3] z:freq  KEYS[4] z:mon   (population sorted sets)
-- KEYS[5 + 3*(i-1)], KEYS[6 + 3*(i-1)], KEYS[7 + 3*(i-1)]
--          customer i's state hash, event-id list, order-id list      (i = 1..n_customers)
--
-- ARGV[1]  batch_last_offset   highest offset of the batch (dead letters included)
-- ARGV[2]  max_event_ids       ARGV[3] max_order_ids
-- ARGV[4]  n_customers         ARGV[5 .. 4+n] the customer ids, in KEYS order
-- then 7 values per event, in offset order:
--          offset, customer index (1-based), event_id, order_id, kind ("p" | "r"),
--          amount (minor units), occurred (epoch ms)
--
-- Returns  {applied, duplicate_offsets, duplicate_events, last_offset_before,
--           then per customer 8 strings: frequency, purchases, refunds, last_purchase_ms,
--           first_purchase_ms, segment, cluster, change}  ("" where absent)
--          change: "" nothing applied to the customer, "u" updated, "n" its first purchase
-- Numbers are written with %.0f: Lua's default number format keeps only 14 digits.

local function fmt(x) return string.format('%.0f', x) end

local meta = KEYS[1]
local z_last, z_freq, z_mon = KEYS[2], KEYS[3], KEYS[4]
local batch_last = tonumber(ARGV[1])
local max_ev, max_ord = tonumber(ARGV[2]), tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local first_event_arg = 5 + n

local last_before = tonumber(redis.call('HGET', meta, 'offset') or '-1')
local wm = tonumber(redis.call('HGET', meta, 'wm') or '-1')
local last = last_before

-- load each named customer once
local st = {}
for i = 1, n do
  local k = KEYS[5 + 3 * (i - 1)]
  local v = redis.call('HMGET', k, 'f', 'buy', 'ref', 'last', 'first', 'seg', 'cl')
  st[i] = {f = tonumber(v[1] or '0'), buy = tonumber(v[2] or '0'), ref = tonumber(v[3] or '0'),
           last = tonumber(v[4] or ''), first = tonumber(v[5] or ''),
           seg = v[6] or '', cl = v[7] or '', dirty = false,
           had_purchase = v[4] ~= false and v[4] ~= nil}
end

local applied, dup_off, dup_ev = 0, 0, 0
local i = first_event_arg
while i <= #ARGV do
  local off = tonumber(ARGV[i])
  local ci = tonumber(ARGV[i + 1])
  local event_id, order_id, kind = ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local amount, t = tonumber(ARGV[i + 5]), tonumber(ARGV[i + 6])
  i = i + 7
  if off <= last then
    dup_off = dup_off + 1
  else
    last = off
    local ev_key = KEYS[6 + 3 * (ci - 1)]
    if redis.call('LPOS', ev_key, event_id) then
      dup_ev = dup_ev + 1
    else
      redis.call('LPUSH', ev_key, event_id)
      redis.call('LTRIM', ev_key, 0, max_ev - 1)
      local s = st[ci]
      s.dirty = true
      if kind == 'r' then
        s.ref = s.ref + amount
      else
        local ord_key = KEYS[7 + 3 * (ci - 1)]
        if not redis.call('LPOS', ord_key, order_id) then
          s.f = s.f + 1
          redis.call('LPUSH', ord_key, order_id)
          redis.call('LTRIM', ord_key, 0, max_ord - 1)
        end
        s.buy = s.buy + amount
        if s.last == nil or t > s.last then s.last = t end
        if s.first == nil or t < s.first then s.first = t end
      end
      applied = applied + 1
      if t > wm then wm = t end
    end
  end
end
if batch_last > last then last = batch_last end

local out = {applied, dup_off, dup_ev, last_before}
for ci = 1, n do
  local s = st[ci]
  local k = KEYS[5 + 3 * (ci - 1)]
  if s.dirty then
    redis.call('HSET', k, 'f', fmt(s.f), 'buy', fmt(s.buy), 'ref', fmt(s.ref))
    if s.last ~= nil then
      redis.call('HSET', k, 'last', fmt(s.last), 'first', fmt(s.first))
      local member = ARGV[4 + ci]
      local mon = s.buy - s.ref
      if mon < 0 then mon = 0 end
      redis.call('ZADD', z_last, fmt(s.last), member)
      redis.call('ZADD', z_freq, fmt(s.f), member)
      redis.call('ZADD', z_mon, fmt(mon), member)
    end
  end
  local last_s, first_s = '', ''
  if s.last ~= nil then last_s, first_s = fmt(s.last), fmt(s.first) end
  out[#out + 1] = fmt(s.f)
  out[#out + 1] = fmt(s.buy)
  out[#out + 1] = fmt(s.ref)
  out[#out + 1] = last_s
  out[#out + 1] = first_s
  out[#out + 1] = s.seg
  out[#out + 1] = s.cl
  local change = ''
  if s.dirty then
    change = 'u'
    if s.last ~= nil and not s.had_purchase then change = 'n' end
  end
  out[#out + 1] = change
end

if last > last_before then redis.call('HSET', meta, 'offset', fmt(last)) end
if wm >= 0 then redis.call('HSET', meta, 'wm', fmt(wm)) end
return out
