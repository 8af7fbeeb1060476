#!/bin/bash
# MPICH's launcher calls this as it would ssh: [options] HOST COMMAND... . HOST is a host's
# address (10.77.0.1I, tests/_hosts.py); the command runs in host I's network namespace, with the
# hostname mpisplit-hI in a UTS namespace of its own.
while [[ $1 == -* ]]; do shift; done
host=$1
shift
i=${host##*.}
i=$(( i - 10 ))
exec ip netns exec "mpisplit-h$i" unshare --uts bash -c "hostname mpisplit-h$i && exec $*"
