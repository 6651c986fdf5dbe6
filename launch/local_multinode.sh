#!/bin/bash
# Two "nodes" on one host: two `dltrain launch` processes on 127.0.0.1, machine ranks 0 and 1, each
# with NPROC CPU processes, meeting at a rendezvous port. It exercises the multi-node path (separate
# launchers, static rendezvous, cross-launcher gloo) without a cluster.
#
#   launch/local_multinode.sh RECIPE [dltrain train options]       (e.g. --profile cpu_test)
#   NPROC=2 PORT=29700 launch/local_multinode.sh RECIPE ...
# Exits non-zero if either "node" fails; a failing node takes the other down.
set -uo pipefail
: "${1:?usage: launch/local_multinode.sh RECIPE [dltrain train options]}"
NPROC=${NPROC:-1}
PORT=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
DLTRAIN=${DLTRAIN:-dltrain}

$DLTRAIN launch --cpu --nproc "$NPROC" --nnodes 2 --node-rank 1 --master "127.0.0.1:$PORT" "$@" &
node1=$!
$DLTRAIN launch --cpu --nproc "$NPROC" --nnodes 2 --node-rank 0 --master "127.0.0.1:$PORT" "$@"
rc0=$?
[ $rc0 -ne 0 ] && kill "$node1" 2>/dev/null   # do not leave node 1 waiting for a peer that is gone
wait "$node1"
rc1=$?
echo "local_multinode: node 0 exit $rc0, node 1 exit $rc1" >&2
[ $rc0 -eq 0 ] && [ $rc1 -eq 0 ]
