#!/bin/sh
# Starts one Redis Cluster node.
#
# nodes.conf records this node's own address ("myself"); a pod gets a new IP when it
# is rescheduled, so the stale entry is replaced with the current one before Redis
# reads it. Peers then learn the new address from this node's gossip.
set -eu
if [ -f /data/nodes.conf ]; then
  sed -i -e "/myself/ s/[0-9]\{1,3\}\.[0-9]\{1,3\}\.[0-9]\{1,3\}\.[0-9]\{1,3\}/${POD_IP}/" /data/nodes.conf
fi
exec redis-server /etc/redis/redis.conf \
  --cluster-announce-ip "${POD_IP}" \
  --requirepass "${REDISCLI_AUTH}" \
  --masterauth "${REDISCLI_AUTH}"
