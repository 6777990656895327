-- outbox_ack.lua: delete outbox entries the broker acknowledged, for the partition's publisher
-- only (see outbox_read.lua). A publisher whose partition was claimed by another while its
-- entries were in flight leaves them: the new owner publishes them again (a duplicate, which
-- consumers drop by change_id), never fewer.
--
-- The entries a publisher read are the oldest ones (XRANGE from '-'), and a stream's ids only
-- grow: entries are added after them (a commit, a forget's tombstone) or deleted (a forget).
-- So while the oldest entry is still the oldest one read, deleting every entry up to the
-- newest one read deletes exactly those still there: XTRIM MINID, without naming each (XDEL
-- of ~1,000 ids through Lua cost Redis ~1.5 ms a round). Otherwise (a forget deleted the
-- oldest one read, or the stream was lost and made again, maybe with smaller ids on a server
-- whose clock is behind) nothing is deleted: the entries are read and published again.
--
-- KEYS[1] meta  KEYS[2] outbox
-- ARGV[1] the publisher's token   ARGV[2] the oldest id read
-- ARGV[3] the smallest id to keep (the newest id read + 1)
-- Returns the number of entries deleted.
-- Errors "FENCED <token>" when another token holds the partition; nothing is deleted.

local holder = redis.call('HGET', KEYS[1], 'pub')
if not holder then
  redis.call('HSET', KEYS[1], 'pub', ARGV[1])
elseif holder ~= ARGV[1] then
  return redis.error_reply('FENCED ' .. holder)
end
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
if first == nil or first[1] ~= ARGV[2] then
  return 0
end
return redis.call('XTRIM', KEYS[2], 'MINID', ARGV[3])
