#!/bin/bash
B=${PROXY:-target/release/proxy}
CGM=$(awk '$3=="cgroup2"{print $2; exit}' /proc/mounts)
CG=$CGM/s12bench
cleanup() { kill $AG $SRV 2>/dev/null; sleep 1; ip netns del s12a; ip netns del s12b; rmdir $CG/app $CG/sib $CG 2>/dev/null; }
trap cleanup EXIT
ip netns add s12a; ip netns add s12b
ip link add s12va netns s12a type veth peer name s12vb netns s12b
ip -n s12a addr add 10.0.0.1/24 dev s12va; ip -n s12b addr add 10.0.0.2/24 dev s12vb
ip -n s12b addr add 198.51.100.1/32 dev lo
for n in s12a s12b; do ip -n $n link set lo up; done
ip -n s12a link set s12va up; ip -n s12b link set s12vb up
ip -n s12a route add default via 10.0.0.2; ip -n s12b route add default via 10.0.0.1
mkdir -p $CG/app $CG/sib
ip netns exec s12b python3 $(dirname "$0")/bsrv.py & SRV=$!
nsenter --net=/run/netns/s12a $B run --local --cgroup s12bench/app --dport 80 --on-port 50080 > $(dirname "$0")/bagent.log 2>&1 & AG=$!
sleep 2
run() { sh -c "echo \$\$ > $CG/$1/cgroup.procs; exec ip netns exec s12a python3 $(dirname "$0")/bcli.py $2 $3"; }
for r in 1 2 3; do
  echo "round $r"
  echo -n "sibling cgroup (no program), port 81 direct: "; run sib 81 3000
  echo -n "app cgroup (program runs, no rule), port 81 direct: "; run app 81 3000
  echo -n "sibling cgroup, port 80 direct: "; run sib 80 3000
  echo -n "app cgroup, port 80 through the proxy: "; run app 80 3000
done
kill -TERM $AG; wait $AG
