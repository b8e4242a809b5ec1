//! The UDP throughput figure: datagrams per second received and the loss, routed (a)
//! against proxied (c) (its agent runs with `--protocol tcp,udp`, so port-80 datagrams go
//! through the agent's UDP sessions), for one flow and for many (`Plan::udp_flows`), runs
//! interleaved.

use crate::{
    Plan, fmt_runs,
    load::PORT,
    record,
    report::Results,
    setup::Scenario,
    udp_rate::{self, UdpLoad},
};

/// Measures `plan.udp_rate_runs` runs of each flow count on (a) and (c), into
/// `results.udp_rate` and `results.udp_loss`.
pub fn measure(
    routing: &Scenario,
    ebpf: &Scenario,
    plan: &Plan,
    results: &mut Results,
    progress: &dyn Fn(&str),
) -> Result<(), String> {
    for run in 1..=plan.udp_rate_runs {
        for (i, &flows) in plan.udp_flows.iter().enumerate() {
            let (mut rates, mut losses) = (Vec::new(), Vec::new());
            for s in [routing, ebpf] {
                let load = UdpLoad {
                    port: PORT,
                    flows,
                    duration: plan.udp_rate_duration,
                };
                let measured = udp_rate::run(&s.gw.client.name, load);
                let what = format!("UDP, {flows} flow(s)");
                let rate = record(
                    results,
                    &what,
                    s.kind,
                    measured
                        .as_ref()
                        .map(|r| r.received_per_sec())
                        .map_err(|e| e.to_string()),
                );
                let loss = measured.ok().map(|r| r.loss_percent());
                results.udp_rate[i].push(s.kind, rate);
                results.udp_loss[i].push(s.kind, loss);
                rates.push(rate.map(|x| x / 1e3));
                losses.push(loss);
            }
            let kinds = [routing.kind, ebpf.kind];
            progress(&format!(
                "UDP run {run}/{}, {flows} flow(s): {}; loss {}",
                plan.udp_rate_runs,
                fmt_runs(&kinds, &rates, "k datagrams/s"),
                fmt_runs(&kinds, &losses, "%"),
            ));
            crate::check("UDP throughput")?;
        }
    }
    Ok(())
}
