-- Opens a partition for a projector that was just assigned it: returns the
-- read model's checkpoint, where consumption must resume. A partition the read
-- model knows nothing of (a fresh Redis, or one that lost its data) starts
-- from the beginning of the log, and is marked as rebuilding until it reaches
-- the log end seen now, so that readers do not take its gaps for absent users.
--
-- KEYS[1] checkpoint hash: partition -> offset of the last applied event
-- KEYS[2] rebuild hash: partition -> log end to reach
-- ARGV[1] partition
-- ARGV[2] the partition's log end offset (high watermark), read just before
--
-- Returns {checkpoint, rebuild target or ''}; '-1' means nothing applied.
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  return {current, redis.call('HGET', KEYS[2], ARGV[1]) or ''}
end
redis.call('HSET', KEYS[1], ARGV[1], '-1')
if tonumber(ARGV[2]) > 0 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  return {'-1', ARGV[2]}
end
return {'-1', ''}
