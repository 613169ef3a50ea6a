# shellcheck shell=bash
# Throwaway PostgreSQL and Redis Cluster instances for tests, benchmarks and drills.
#
# Source this file, then:
#
#   ensure_tools                          # install postgresql/redis with apt if missing
#   trap stop_all EXIT                    # always tear down, even on failure
#   start_postgres "$tmp"                 # exports AUTH_TEST_DATABASE_URL, AUTH_TEST_PG_BIN_DIR,
#                                         #         AUTH_TEST_PG_OS_USER
#   start_redis_cluster "$tmp" 3 1        # exports AUTH_TEST_REDIS_URLS, AUTH_TEST_REDIS_SERVER_BIN
#   ...
#   stop_all                              # stops what was started, deletes the directories
#
# Everything listens on 127.0.0.1 only, on free ports chosen at random, so several runs
# (and the machine's own PostgreSQL on 5432 / Redis on 6379) coexist. Each start
# function owns the DIR it is given: stop_all deletes it.
#
# Messages go to stderr, prefixed with "datastores:".

# State for stop_all. Plain globals, not exported: stop_all runs in the shell that
# started things (from a trap), never in a child.
_DS_PG_DATA_DIRS=()   # PostgreSQL data directories started with pg_ctl
_DS_REDIS_NODES=()    # "port:node_dir" for every Redis node we tried to start
_DS_OWNED_DIRS=()     # directories stop_all deletes
_DS_RESERVED_PORTS=() # ports handed out in this shell but perhaps not bound yet

_ds_log() { printf 'datastores: %s\n' "$*" >&2; }
_ds_die() {
	printf 'datastores: ERROR: %s\n' "$*" >&2
	return 1
}

# Monotonic-enough milliseconds, for bounded waits and timings.
_ds_now_ms() { echo $(($(date +%s%N) / 1000000)); }

# Directory holding initdb, pg_ctl and postgres, or nothing. Prefers
# AUTH_TEST_PG_BIN_DIR, then whatever is on PATH (symlinks resolved), then the newest
# Debian /usr/lib/postgresql/<version>/bin (Debian does not put initdb on PATH).
_ds_pg_bin_dir() {
	local candidates=() d exe
	[[ -n ${AUTH_TEST_PG_BIN_DIR:-} ]] && candidates+=("$AUTH_TEST_PG_BIN_DIR")
	for exe in pg_ctl initdb postgres; do
		if command -v "$exe" >/dev/null 2>&1; then
			candidates+=("$(dirname "$(readlink -f "$(command -v "$exe")")")")
		fi
	done
	while IFS= read -r d; do
		candidates+=("$d")
	done < <(compgen -G '/usr/lib/postgresql/*/bin' | sort -rV)
	for d in "${candidates[@]}"; do
		if [[ -x $d/initdb && -x $d/pg_ctl && -x $d/postgres ]]; then
			echo "$d"
			return 0
		fi
	done
	return 1
}

# ensure_tools: make sure PostgreSQL server binaries, redis-server and redis-cli exist,
# installing the Debian packages when they do not (root only).
ensure_tools() {
	local missing=() packages=()
	if ! _ds_pg_bin_dir >/dev/null; then
		missing+=("initdb/pg_ctl/postgres")
		packages+=(postgresql)
	fi
	if ! command -v redis-server >/dev/null 2>&1; then
		missing+=(redis-server)
		packages+=(redis-server)
	fi
	if ! command -v redis-cli >/dev/null 2>&1; then
		missing+=(redis-cli)
		packages+=(redis-tools)
	fi
	if ((${#packages[@]} > 0)); then
		if [[ $(id -u) -ne 0 ]]; then
			_ds_die "missing ${missing[*]}; install them with: sudo apt-get update && sudo apt-get install -y ${packages[*]}"
			return 1
		fi
		_ds_log "missing ${missing[*]}: installing ${packages[*]} with apt-get"
		DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 ||
			{
				_ds_die "apt-get update failed"
				return 1
			}
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${packages[@]}" </dev/null >&2 ||
			{
				_ds_die "apt-get install ${packages[*]} failed"
				return 1
			}
		_ds_pg_bin_dir >/dev/null || {
			_ds_die "initdb/pg_ctl/postgres still not found after installing postgresql"
			return 1
		}
		if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
			_ds_die "redis-server/redis-cli still not found after installing redis"
			return 1
		fi
	fi
	# initdb refuses to run as root; as root we run PostgreSQL as the "postgres" user,
	# which the Debian package creates. Create it if the binaries came from elsewhere.
	if [[ $(id -u) -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
		_ds_log "creating system user postgres (initdb refuses to run as root)"
		useradd --system --user-group --no-create-home --shell /usr/sbin/nologin postgres || {
			_ds_die "could not create the postgres user"
			return 1
		}
	fi
}

# Local TCP ports in use on this machine in any state (listening, connected,
# TIME_WAIT), space-separated with a leading and trailing space, read from
# /proc/net/tcp{,6}. Stricter than a connect probe: a port held by an outgoing
# connection cannot be bound either.
_ds_used_ports() {
	local hex out=" "
	# Field 2 is local_address "HEXIP:HEXPORT".
	while read -r hex; do
		[[ $hex =~ ^[0-9A-Fa-f]+$ ]] && out+="$((16#$hex)) "
	done < <(awk 'FNR > 1 { n = split($2, a, ":"); print a[n] }' /proc/net/tcp /proc/net/tcp6 2>/dev/null | sort -u)
	echo "$out"
}

# free_port [--with-bus]: print a free loopback TCP port. With --with-bus, port+10000
# (a Redis Cluster node's bus port) is free too.
#
# Ports come from below the kernel's ephemeral range (ip_local_port_range, normally
# 32768-60999), so outgoing connections made later (e.g. by the tests' connection pools)
# cannot grab them between our pick and the server's bind. Ports already handed out in
# this shell (_DS_RESERVED_PORTS, with their bus ports) are avoided too. Callers that
# start servers from the same shell should append the port they got to
# _DS_RESERVED_PORTS (the start_* functions do).
free_port() {
	local bus=0 lo=10000 hi ephemeral_lo attempt port p clash used
	[[ ${1:-} == --with-bus ]] && bus=1
	ephemeral_lo=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
	hi=$((ephemeral_lo - 1))
	((bus)) && hi=$((ephemeral_lo - 10001))
	if ((hi - lo < 1000)); then
		# Odd ephemeral range: fall back to a fixed band (bus ports must stay < 65536).
		lo=20000 hi=50000
		((bus)) && hi=45000
	fi
	used=$(_ds_used_ports)
	for ((attempt = 0; attempt < 200; attempt++)); do
		port=$((lo + (RANDOM * 32768 + RANDOM) % (hi - lo + 1)))
		clash=0
		for p in "${_DS_RESERVED_PORTS[@]}"; do
			# A reserved port may be a cluster node, whose bus is p+10000.
			if ((port == p || port == p + 10000 || (bus && port + 10000 == p))); then
				clash=1
				break
			fi
		done
		((clash)) && continue
		[[ $used == *" $port "* ]] && continue
		((bus)) && [[ $used == *" $((port + 10000)) "* ]] && continue
		echo "$port"
		return 0
	done
	_ds_die "no free TCP port found in $lo-$hi"
}

# Run a command as the OS user that owns PostgreSQL's files (postgres when we are root,
# since initdb and postgres refuse to run as root), from a directory that user can read.
_ds_as_pg_user() {
	local cwd=$1
	shift
	if [[ $(id -u) -eq 0 ]]; then
		# runuser lives in /usr/sbin, which a minimal PATH may lack.
		(cd "$cwd" && "$(command -v runuser || echo /usr/sbin/runuser)" -u postgres -- "$@")
	else
		(cd "$cwd" && "$@")
	fi
}

# start_postgres DIR: initdb a fresh cluster in DIR/pg and start it on 127.0.0.1 at a
# free port, trust auth, fsync off (data is throwaway), max_connections=300 (tests run
# many app instances, each with its own pool). Exports:
#   AUTH_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:<port>/postgres
#   AUTH_TEST_PG_BIN_DIR=<dir with initdb, pg_ctl, postgres>
#   AUTH_TEST_PG_OS_USER=<OS user that must run initdb/pg_ctl/postgres: postgres when
#                         we are root, else the current user>
start_postgres() {
	local dir=${1:?usage: start_postgres DIR}
	local bin pg_dir data port attempt started_ms
	started_ms=$(_ds_now_ms)
	bin=$(_ds_pg_bin_dir) || {
		_ds_die "initdb/pg_ctl/postgres not found (run ensure_tools)"
		return 1
	}
	mkdir -p "$dir"
	_DS_OWNED_DIRS+=("$dir")
	pg_dir=$dir/pg
	data=$pg_dir/data
	mkdir -p "$pg_dir"
	if [[ $(id -u) -eq 0 ]]; then
		# mktemp -d makes DIR mode 700; the postgres user must be able to traverse it.
		chmod a+x "$dir"
		chown postgres: "$pg_dir"
	fi
	# --no-sync: nothing here must survive a crash; saves ~1 s.
	_ds_as_pg_user "$pg_dir" "$bin/initdb" -D "$data" -U postgres -A trust -E UTF8 \
		--locale=C --no-sync >"$pg_dir/initdb.log" 2>&1 || {
		cat "$pg_dir/initdb.log" >&2
		_ds_die "initdb failed (log above)"
		return 1
	}
	cat >>"$data/postgresql.conf" <<-EOF

		# Added by scripts/lib/datastores.sh: a throwaway test instance.
		listen_addresses = '127.0.0.1'
		unix_socket_directories = '$pg_dir'
		max_connections = 300
		fsync = off
		synchronous_commit = off
		full_page_writes = off
	EOF
	_DS_PG_DATA_DIRS+=("$data")
	# Retry with another port if some other process binds ours between pick and start.
	for attempt in 1 2 3; do
		port=$(free_port) || return 1
		_DS_RESERVED_PORTS+=("$port")
		if _ds_as_pg_user "$pg_dir" "$bin/pg_ctl" -D "$data" -l "$pg_dir/postgres.log" \
			-o "-p $port" -w -t 30 start >/dev/null 2>&1; then
			break
		fi
		if ((attempt == 3)) || ! grep -q 'could not bind\|Address already in use' "$pg_dir/postgres.log" 2>/dev/null; then
			tail -n 20 "$pg_dir/postgres.log" >&2 2>/dev/null || true
			_ds_die "PostgreSQL did not start (log: $pg_dir/postgres.log)"
			return 1
		fi
		_ds_log "port $port was taken, retrying PostgreSQL on another port"
	done
	export AUTH_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
	export AUTH_TEST_PG_BIN_DIR="$bin"
	if [[ $(id -u) -eq 0 ]]; then
		export AUTH_TEST_PG_OS_USER=postgres
	else
		AUTH_TEST_PG_OS_USER=$(id -un)
		export AUTH_TEST_PG_OS_USER
	fi
	_ds_log "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') up on 127.0.0.1:$port in $(($(_ds_now_ms) - started_ms)) ms"
}

# Value of field $2 in "redis-cli -p $1 $3..." output (INFO / CLUSTER INFO format).
_ds_redis_field() {
	local port=$1 field=$2
	shift 2
	redis-cli -h 127.0.0.1 -p "$port" "$@" 2>/dev/null | tr -d '\r' | sed -n "s/^$field://p"
}

# Start one cluster-enabled Redis node on a free port; print the port.
_ds_start_redis_node() {
	local nodes_dir=$1 index=$2 port node_dir attempt deadline
	for attempt in 1 2 3; do
		port=$(free_port --with-bus) || return 1
		node_dir=$nodes_dir/node-$port
		mkdir -p "$node_dir"
		# Record before starting, so stop_all can clean up even if we are interrupted.
		_DS_REDIS_NODES+=("$port:$node_dir")
		_DS_RESERVED_PORTS+=("$port")
		# repl-diskless-sync-delay 0: Redis 7 waits 5 s by default before the first full
		# sync, and a replica that has not synced never fails over.
		# cluster-replica-validity-factor 0: a replica always may take over a dead master,
		# however long it has been disconnected, so failover drills are deterministic.
		# enable-debug-command local: lets tests use DEBUG SLEEP to simulate a stall.
		redis-server \
			--cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
			--cluster-replica-validity-factor 0 \
			--save "" --appendonly no --repl-diskless-sync-delay 0 \
			--enable-debug-command local \
			--bind 127.0.0.1 --port "$port" --daemonize yes --dir "$node_dir" \
			--logfile "$node_dir/redis.log" --pidfile "$node_dir/redis.pid" >/dev/null || {
			# Non-zero only before daemonizing: a bad option or an unusable binary.
			_ds_die "redis-server refused to start (its message is above)"
			return 1
		}
		deadline=$(($(_ds_now_ms) + 5000))
		while (($(_ds_now_ms) < deadline)); do
			# Ask for its dir rather than PING: if our node failed to bind, whatever else
			# holds the port would answer PING too.
			if [[ $(redis-cli -h 127.0.0.1 -p "$port" config get dir 2>/dev/null | sed -n 2p) == "$node_dir" ]]; then
				echo "$port"
				return 0
			fi
			grep -q 'Address already in use' "$node_dir/redis.log" 2>/dev/null && break
			sleep 0.05
		done
		if ! grep -q 'Address already in use' "$node_dir/redis.log" 2>/dev/null || ((attempt == 3)); then
			tail -n 20 "$node_dir/redis.log" >&2 2>/dev/null || true
			_ds_die "Redis node $index did not start on port $port (log: $node_dir/redis.log)"
			return 1
		fi
		_ds_log "port $port was taken, retrying Redis node $index on another port"
	done
}

# start_redis_cluster DIR [N_MASTERS=3] [N_REPLICAS_PER_MASTER=1]: start
# N_MASTERS*(1+N_REPLICAS_PER_MASTER) cluster-enabled redis-server nodes under
# DIR/redis, join them with redis-cli --cluster create, and wait (at most 30 s) until
# every node reports cluster_state:ok and knows every other node, and every replica has
# finished its first sync (master_link_status:up on the replica, state=online on its
# master): a replica that never synced would not fail over. Exports:
#   AUTH_TEST_REDIS_URLS=redis://127.0.0.1:<p1>,redis://127.0.0.1:<p2>,...  (all nodes)
#   AUTH_TEST_REDIS_SERVER_BIN=<path of redis-server>
start_redis_cluster() {
	local dir=${1:?usage: start_redis_cluster DIR [N_MASTERS] [N_REPLICAS_PER_MASTER]}
	local masters=${2:-3} replicas=${3:-1}
	local total nodes_dir i port ports=() addrs=() urls=() started_ms deadline pending repl
	started_ms=$(_ds_now_ms)
	if ((masters < 3)); then
		_ds_die "redis-cli --cluster create needs at least 3 masters (got $masters)"
		return 1
	fi
	total=$((masters * (1 + replicas)))
	mkdir -p "$dir"
	_DS_OWNED_DIRS+=("$dir")
	nodes_dir=$dir/redis
	mkdir -p "$nodes_dir"
	for ((i = 0; i < total; i++)); do
		# Not port=$(...): the node must be recorded in _DS_REDIS_NODES in this shell.
		_ds_start_redis_node "$nodes_dir" "$i" >"$nodes_dir/.port" || return 1
		port=$(<"$nodes_dir/.port")
		ports+=("$port")
		addrs+=("127.0.0.1:$port")
		urls+=("redis://127.0.0.1:$port")
	done
	rm -f "$nodes_dir/.port"
	if ! redis-cli --cluster create "${addrs[@]}" --cluster-replicas "$replicas" --cluster-yes \
		>"$nodes_dir/cluster-create.log" 2>&1 </dev/null; then
		cat "$nodes_dir/cluster-create.log" >&2
		_ds_die "redis-cli --cluster create failed (output above)"
		return 1
	fi
	deadline=$(($(_ds_now_ms) + 30000))
	while :; do
		pending=()
		for port in "${ports[@]}"; do
			[[ $(_ds_redis_field "$port" cluster_state cluster info) == ok ]] ||
				{
					pending+=("$port: cluster_state not ok")
					continue
				}
			[[ $(_ds_redis_field "$port" cluster_known_nodes cluster info) == "$total" ]] ||
				{
					pending+=("$port: does not know all $total nodes yet")
					continue
				}
			# Both ends of every replication link must be up: the replica's side
			# (master_link_status) flips when it has loaded the RDB, the master's
			# (state=online) only once the replica has acknowledged it.
			repl=$(redis-cli -h 127.0.0.1 -p "$port" info replication 2>/dev/null | tr -d '\r')
			if [[ $repl == *role:slave* ]]; then
				[[ $repl == *master_link_status:up* ]] ||
					pending+=("$port: replica has not finished its first sync")
			elif [[ $(grep -c '^slave[0-9]*:.*state=online' <<<"$repl") -ne $replicas ]]; then
				pending+=("$port: master does not see all $replicas replica(s) online")
			fi
		done
		((${#pending[@]} == 0)) && break
		if (($(_ds_now_ms) > deadline)); then
			printf '  %s\n' "${pending[@]}" >&2
			_ds_die "Redis Cluster not ready after 30 s (logs: $nodes_dir/node-*/redis.log)"
			return 1
		fi
		sleep 0.1
	done
	export AUTH_TEST_REDIS_URLS
	AUTH_TEST_REDIS_URLS=$(
		IFS=,
		echo "${urls[*]}"
	)
	# Not readlink -f: Debian's redis-server is a symlink to redis-check-rdb, and the
	# binary picks its personality from argv[0].
	AUTH_TEST_REDIS_SERVER_BIN=$(command -v redis-server)
	export AUTH_TEST_REDIS_SERVER_BIN
	_ds_log "Redis Cluster ($masters masters, $replicas replica(s) each) up on ports ${ports[*]} in $(($(_ds_now_ms) - started_ms)) ms"
}

# PID from a pidfile if that process is alive and its command line mentions $2.
_ds_live_pid() {
	local pidfile=$1 needle=$2 pid
	[[ -r $pidfile ]] || return 1
	pid=$(head -n 1 "$pidfile" 2>/dev/null) || return 1
	[[ $pid =~ ^[0-9]+$ ]] || return 1
	tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF -- "$needle" || return 1
	echo "$pid"
}

# PIDs of processes whose working directory is $1 (even if it was deleted since). Finds
# a Redis node that has no pidfile yet (it chdirs to --dir first thing) without asking
# its port, which may belong to someone else if our node failed to bind it.
_ds_pids_in_dir() {
	local want=$1 cwd_link cwd
	for cwd_link in /proc/[0-9]*/cwd; do
		cwd=$(readlink "$cwd_link" 2>/dev/null) || continue
		if [[ $cwd == "$want" || $cwd == "$want (deleted)" ]]; then
			cwd_link=${cwd_link#/proc/}
			echo "${cwd_link%/cwd}"
		fi
	done
}

# stop_all: stop every server started from this shell and delete the directories given
# to the start functions. Safe to call twice, after a partial start, and from traps.
# Everything is throwaway, so servers are stopped the fast way (immediate / SIGKILL).
stop_all() {
	local data node port node_dir pid pids=() deadline bin dir
	for data in "${_DS_PG_DATA_DIRS[@]}"; do
		bin=$(_ds_pg_bin_dir 2>/dev/null) || bin=
		if [[ -f $data/postmaster.pid && -n $bin ]]; then
			_ds_as_pg_user / "$bin/pg_ctl" -D "$data" -m immediate -w -t 10 stop >/dev/null 2>&1 || true
		fi
		if pid=$(_ds_live_pid "$data/postmaster.pid" "$data"); then
			kill -KILL "$pid" 2>/dev/null || true
		fi
	done
	_DS_PG_DATA_DIRS=()
	for node in "${_DS_REDIS_NODES[@]}"; do
		port=${node%%:*}
		node_dir=${node#*:}
		if pid=$(_ds_live_pid "$node_dir/redis.pid" ":$port"); then
			pids+=("$pid")
		else
			while read -r pid; do
				[[ -n $pid ]] && pids+=("$pid")
			done < <(_ds_pids_in_dir "$node_dir")
		fi
	done
	_DS_REDIS_NODES=()
	for pid in "${pids[@]}"; do
		kill -KILL "$pid" 2>/dev/null || true
	done
	# Wait until they are gone, so their ports are free when we return.
	deadline=$(($(_ds_now_ms) + 2000))
	for pid in "${pids[@]}"; do
		while [[ -d /proc/$pid && $(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null) != Z ]] &&
			(($(_ds_now_ms) < deadline)); do
			sleep 0.02
		done
	done
	for dir in "${_DS_OWNED_DIRS[@]}"; do
		[[ -n $dir && $dir != / ]] && rm -rf -- "$dir"
	done
	_DS_OWNED_DIRS=()
	_DS_RESERVED_PORTS=()
	return 0
}
