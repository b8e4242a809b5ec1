//! Pass-through: what the agent costs traffic that matches none of its rules. The same
//! traffic, to the server's port 81 (the agent's rule is for port 80), through (a), which has
//! no agent, and through (c), whose classifier sees every packet on r0: TCP bulk (1 stream)
//! and UDP datagrams (one flow). Runs alternate which set-up goes first, so that neither
//! always follows the other; each run's (c)/(a) is a ratio of two measurements taken
//! seconds apart.

use std::net::SocketAddr;

use proxy_testbed::SERVER_V4;

use crate::{
    Plan, fmt_runs,
    load::{self, OTHER_PORT},
    record,
    report::Results,
    setup::Scenario,
    udp_rate::{self, UdpLoad},
};

/// Measures `plan.passthrough_runs` runs on (a) and (c), into `results.passthrough_*`.
pub fn measure(
    routing: &Scenario,
    ebpf: &Scenario,
    plan: &Plan,
    results: &mut Results,
    progress: &dyn Fn(&str),
) -> Result<(), String> {
    let addr = SocketAddr::from((SERVER_V4, OTHER_PORT));
    for run in 1..=plan.passthrough_runs {
        let order = if run % 2 == 1 {
            [routing, ebpf]
        } else {
            [ebpf, routing]
        };
        let kinds = order.map(|s| s.kind);
        let mut tcp = Vec::new();
        for s in order {
            let v = load::bulk_to(&s.gw.client.name, addr, 1, plan.passthrough_duration)
                .map(|bps| bps / 1e9);
            let v = record(results, "pass-through, TCP to port 81", s.kind, v);
            results.passthrough_tcp.push(s.kind, v);
            tcp.push(v);
        }
        crate::check("pass-through")?;
        let mut udp = Vec::new();
        for s in order {
            let load = UdpLoad {
                port: OTHER_PORT,
                flows: 1,
                duration: plan.passthrough_duration,
            };
            let v = udp_rate::run(&s.gw.client.name, load).map(|r| r.received_per_sec());
            let v = record(results, "pass-through, UDP to port 81", s.kind, v);
            results.passthrough_udp.push(s.kind, v);
            udp.push(v);
        }
        progress(&format!(
            "pass-through run {run}/{}: TCP {}; UDP {}",
            plan.passthrough_runs,
            fmt_runs(&kinds, &tcp, "Gbit/s"),
            fmt_runs(&kinds, &thousands_of(&udp), "k datagrams/s"),
        ));
        crate::check("pass-through")?;
    }
    Ok(())
}

fn thousands_of(values: &[Option<f64>]) -> Vec<Option<f64>> {
    values.iter().map(|v| v.map(|x| x / 1e3)).collect()
}
