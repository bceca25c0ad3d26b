-- now.lua: the store's clock, in epoch milliseconds (and proof that the store answers).
return clock()
