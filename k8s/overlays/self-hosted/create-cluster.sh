#!/bin/sh
# Forms the Redis Cluster (3 masters, 3 replicas) the first time, and is safe to run
# again: when the cluster already exists, it only introduces every node at its
# current pod IP again (CLUSTER MEET), which repairs a cluster whose pods were all
# rescheduled at once and no longer know each other's addresses.
set -eu
nodes=6
ips=""
i=0
while [ "$i" -lt "$nodes" ]; do
  host="redis-cluster-$i.redis-cluster"
  tries=0
  until ip=$(getent hosts "$host" | awk '{print $1; exit}') && [ -n "$ip" ] \
      && redis-cli -h "$ip" ping 2>/dev/null | grep -q PONG; do
    tries=$((tries + 1))
    if [ "$tries" -gt 150 ]; then
      echo "redis-cluster-create: $host did not answer PING within 5 minutes" >&2
      exit 1
    fi
    sleep 2
  done
  ips="$ips $ip"
  i=$((i + 1))
done

for ip in $ips; do
  if redis-cli -h "$ip" cluster info | grep -q '^cluster_slots_assigned:16384'; then
    echo "redis-cluster-create: cluster already formed (seen from $ip); re-introducing all nodes"
    for peer in $ips; do
      redis-cli -h "$ip" cluster meet "$peer" 6379 >/dev/null
    done
    sleep 5
    redis-cli -h "$ip" cluster info | grep -E '^cluster_(state|known_nodes|size):'
    exit 0
  fi
done

echo "redis-cluster-create: forming a new cluster from:$ips"
set --
for ip in $ips; do set -- "$@" "$ip:6379"; done
redis-cli --cluster create "$@" --cluster-replicas 1 --cluster-yes
