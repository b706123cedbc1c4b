-- Reserves a user id for a CreateUser command, atomically, so that of two
-- concurrent creates of one id (on any instances) exactly one wins.
--
-- KEYS[1] request-id record (a placeholder key when there is no request id)
-- KEYS[2] id sequence, for ids the service assigns
-- ARGV[1] '1' when the request carries a request id
-- ARGV[2] the request's fingerprint (its fields)
-- ARGV[3] the client's id, or '' to assign one
-- ARGV[4] TTL of the pending request-id record, seconds: longer than a
--         publish can take, short enough that a crashed call's request id is
--         usable again soon
-- ARGV[5] prefix of id reservation keys
-- ARGV[6] prefix of read-model user keys (`user_`)
-- ARGV[7] the reservation's owner: 'req:<request id>', or 'fp:<fingerprint>'
--         for a request without one
--
-- Returns {'replay', record} | {'exists', id} | {'reserved', id}
local has_req = ARGV[1] == '1'
local fingerprint = ARGV[2]
local wanted = ARGV[3]
local ttl = tonumber(ARGV[4])
local resv_prefix = ARGV[5]
local user_prefix = ARGV[6]
local owner = ARGV[7]

if has_req then
  local prev = redis.call('GET', KEYS[1])
  if prev then
    return {'replay', prev}
  end
end

local function taken(id)
  return redis.call('EXISTS', resv_prefix .. id, user_prefix .. id) > 0
end

local id = wanted
if id ~= '' then
  if redis.call('EXISTS', user_prefix .. id) > 0 then
    return {'exists', id}
  end
  local holder = redis.call('GET', resv_prefix .. id)
  -- A retry of a call that reserved this id and then died (its pending
  -- record expired) takes it again; anyone else finds it taken.
  if holder and not (has_req and holder == owner) then
    return {'exists', id}
  end
else
  -- Client-chosen ids may already sit on the sequence's path: skip them.
  repeat
    id = tostring(redis.call('INCR', KEYS[2]))
  until not taken(id)
end

redis.call('SET', resv_prefix .. id, owner)
if has_req then
  local record = cjson.encode({state = 'pending', fingerprint = fingerprint, id = id})
  redis.call('SET', KEYS[1], record, 'EX', ttl)
end
return {'reserved', id}
