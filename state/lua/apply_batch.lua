-- apply_batch.lua: commit one batch of one partition atomically, in offset order: the RFM
-- update of every event, the partition's last applied offset and event-time watermark, the
-- customers' new segment assignments (with the per-segment counts) and the outbox entries of
-- the segment changes they caused and of the batch's dead letters. Nothing is written unless the partition's stored offset is
-- the one the caller read (compare-and-set): the caller computed the changes from that state.
-- The RFM part is the twin of state.rfm.apply_batch (a differential test demands identical
-- state).
--
-- KEYS[1]  meta hash of the partition   (fields: offset, wm)
-- KEYS[2]  z:last  KEYS[3] z:freq  KEYS[4] z:mon     (population sorted sets)
-- KEYS[5]  segcount hash                KEYS[6] outbox stream
-- KEYS[7 + 3*(i-1)] .. KEYS[9 + 3*(i-1)]: customer i's state hash, event-id list, order-id list
--
-- ARGV[1]  expected offset (what the caller read; -1 when none)
-- ARGV[2]  batch_last_offset (highest offset of the batch, dead letters included)
-- ARGV[3]  max_event_ids   ARGV[4] max_order_ids
-- ARGV[5]  n customers     ARGV[6] n events   ARGV[7] n assignments   ARGV[8] n outbox entries
-- then     the n customer ids, in KEYS order
-- then     7 values per event, in offset order: offset, customer index (1-based), event_id,
--          order_id, kind ("p" | "r"), amount (minor units), occurred (epoch ms)
-- then     3 values per assignment: customer index, segment, cluster ("" = none)
-- then     2 values per outbox entry: kind ("c" segment change | "d" dead letter), JSON text
--
-- Returns  {applied, duplicate_offsets, duplicate_events}
-- Errors   "CONFLICT <stored offset>" when the stored offset is not the expected one.
-- Numbers are written with %.0f: Lua's default number format keeps only 14 digits.

local function fmt(x) return string.format('%.0f', x) end

local meta = KEYS[1]
local z_last, z_freq, z_mon, segcount, outbox = KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local expected, batch_last = tonumber(ARGV[1]), tonumber(ARGV[2])
local max_ev, max_ord = tonumber(ARGV[3]), tonumber(ARGV[4])
local n, n_ev, n_as, n_out = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])

local stored = tonumber(redis.call('HGET', meta, 'offset') or '-1')
if stored ~= expected then
  return redis.error_reply('CONFLICT ' .. fmt(stored))
end
local wm = tonumber(redis.call('HGET', meta, 'wm') or '-1')
local last = stored

local function ckey(ci, j) return KEYS[6 + 3 * (ci - 1) + j] end

local st = {}
for ci = 1, n do
  local v = redis.call('HMGET', ckey(ci, 1), 'f', 'buy', 'ref', 'last', 'first')
  st[ci] = {f = tonumber(v[1] or '0'), buy = tonumber(v[2] or '0'), ref = tonumber(v[3] or '0'),
            last = tonumber(v[4] or ''), first = tonumber(v[5] or ''), dirty = false}
end

local applied, dup_off, dup_ev = 0, 0, 0
local a = 9 + n
for _ = 1, n_ev do
  local off, ci = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local event_id, order_id, kind = ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local amount, t = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  a = a + 7
  if off <= last then
    dup_off = dup_off + 1
  else
    last = off
    if redis.call('LPOS', ckey(ci, 2), event_id) then
      dup_ev = dup_ev + 1
    else
      redis.call('LPUSH', ckey(ci, 2), event_id)
      redis.call('LTRIM', ckey(ci, 2), 0, max_ev - 1)
      local s = st[ci]
      s.dirty = true
      if kind == 'r' then
        s.ref = s.ref + amount
      else
        if not redis.call('LPOS', ckey(ci, 3), order_id) then
          s.f = s.f + 1
          redis.call('LPUSH', ckey(ci, 3), order_id)
          redis.call('LTRIM', ckey(ci, 3), 0, max_ord - 1)
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

for ci = 1, n do
  local s = st[ci]
  if s.dirty then
    local k = ckey(ci, 1)
    redis.call('HSET', k, 'f', fmt(s.f), 'buy', fmt(s.buy), 'ref', fmt(s.ref))
    if s.last ~= nil then
      redis.call('HSET', k, 'last', fmt(s.last), 'first', fmt(s.first))
      local member = ARGV[8 + ci]
      local mon = s.buy - s.ref
      if mon < 0 then mon = 0 end
      redis.call('ZADD', z_last, fmt(s.last), member)
      redis.call('ZADD', z_freq, fmt(s.f), member)
      redis.call('ZADD', z_mon, fmt(mon), member)
    end
  end
end

for _ = 1, n_as do
  local k = ckey(tonumber(ARGV[a]), 1)
  local seg, cl = ARGV[a + 1], ARGV[a + 2]
  a = a + 3
  local old = redis.call('HGET', k, 'seg') or ''
  if old ~= seg then
    if old ~= '' then redis.call('HINCRBY', segcount, old, -1) end
    redis.call('HINCRBY', segcount, seg, 1)
  end
  redis.call('HSET', k, 'seg', seg, 'cl', cl)
end

for _ = 1, n_out do
  redis.call('XADD', outbox, '*', 'k', ARGV[a], 'v', ARGV[a + 1])
  a = a + 2
end

if last > stored then redis.call('HSET', meta, 'offset', fmt(last)) end
if wm >= 0 then redis.call('HSET', meta, 'wm', fmt(wm)) end
return {applied, dup_off, dup_ev}
