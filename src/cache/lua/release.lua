-- Gives back an id reserved by a CreateUser whose publish failed, so that a
-- retry can take it again. Deletes only what this request wrote.
--
-- KEYS[1] id reservation key
-- KEYS[2] request-id record (a placeholder key when there is no request id)
-- ARGV[1] the reservation's owner (see reserve.lua)
-- ARGV[2] '1' when the request carries a request id
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
if ARGV[2] == '1' then
  local record = redis.call('GET', KEYS[2])
  if record and cjson.decode(record).state == 'pending' then
    redis.call('DEL', KEYS[2])
  end
end
return 1
