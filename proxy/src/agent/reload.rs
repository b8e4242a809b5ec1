//! SIGHUP: re-reads `--config`, and only if everything about it is usable, switches the
//! classifier, the routing and the listeners over without detaching. Connections already
//! accepted live on: their packets find their sockets through the established lookup,
//! under the new rules or the return path.
//!
//! [`Agent::plan`] first, where nothing a packet can see changes; then [`Agent::apply`], in
//! an order that never lets a packet meet a half-made rule: the new rules' listeners and
//! routes first, then the classifier's generation switch (atomic, see
//! [`crate::generation`]), and only after it the old generation's tables, routes and
//! listeners. A failure before the switch undoes what was added ([`roll_back`]) and leaves
//! the rules in force as they were.

use log::{error, info, warn};

use super::{
    Agent, AgentError, LocalScope, global_config,
    listeners::{Listeners, Pending},
    marks, report,
    slots::{self, Keys},
};

use crate::{
    access_log,
    config::{ListenerMode, RunArgs},
    error_chain, generation,
    handover::Inherited,
    routing::PolicyRouting,
    rules::{self, Compiled, Rule},
};

/// A reload, planned: the new rules with their slots, their tables, the listeners they
/// need opened (not serving yet) and the running ones they no longer need.
struct Plan {
    rules: Vec<Rule>,
    compiled: Compiled,
    pending: Pending,
    obsolete: Keys,
}

impl Agent {
    /// Reloads `--config` (see the module docs), because of `why` (SIGHUP, the file
    /// changed); on success the new rules are in force, and in `self.rules`. Either way
    /// the outcome is counted for `proxy stats` and the metrics, and logged.
    pub async fn reload_logged(&mut self, why: &str) {
        match self.reload(why).await {
            Ok(()) => {
                self.rules_status.applied(&self.rules);
                info!(
                    "reload applied: {} rule(s) in force, rules hash {}",
                    self.rules.len(),
                    self.rules_status.hash()
                );
            }
            Err(e) => {
                let why = error_chain(&e);
                error!("reload refused, the rules in force stay: {why}");
                self.rules_status.refused(why);
            }
        }
    }

    async fn reload(&mut self, why: &str) -> Result<(), AgentError> {
        let plan = Self::plan(&self.args, &self.listeners, self.local.as_ref(), why)?;
        let rules = self.apply(plan).await?;
        access_log::rules_in_force(&rules);
        self.rules = rules;
        Ok(())
    }
    /// Reads and checks the new rules, numbers their listeners and opens the new ones.
    fn plan(
        args: &RunArgs,
        listeners: &Listeners,
        local: Option<&LocalScope>,
        why: &str,
    ) -> Result<Plan, AgentError> {
        let Some(path) = &args.config else {
            return Err(AgentError::Unsupported(
                "SIGHUP: nothing to reload (the rules come from flags, not --config)".into(),
            ));
        };
        info!("{why}: reloading {}", path.display());
        let mut rules = args.rules()?;
        super::checks::check_supported(&rules, args.listener)?;
        super::checks::check_outbound_mark(&rules, args.outbound_mark)?;
        super::checks::check_local_scope(&rules, local)?;
        let (pending, obsolete) = if args.listener == ListenerMode::Builtin {
            let (running_tcp, running_udp) = listeners.running();
            let slots = slots::plan(&rules, &running_tcp, &running_udp)?;
            slots.assign(&mut rules);
            (
                Pending::open(&slots, listeners.workers(), &mut Inherited::default())?,
                slots.obsolete,
            )
        } else {
            (Pending::default(), Keys::default())
        };
        let compiled = rules::compile(&rules)?;
        Ok(Plan {
            rules,
            compiled,
            pending,
            obsolete,
        })
    }

    /// Puts `plan` in force: what the new rules need, the switch, then the old generation
    /// retired. Before the switch an error is rolled back; after it, it is reported.
    async fn apply(&mut self, plan: Plan) -> Result<Vec<Rule>, AgentError> {
        let Agent {
            args,
            rules: in_force,
            listeners,
            installed,
            local,
            return_path,
            return_path_lookup,
            ..
        } = self;
        let (classifier, routing) = (&mut installed.classifier, &mut installed.routing);
        let Plan {
            rules,
            compiled,
            pending,
            obsolete,
        } = plan;
        // Connections accepted so far may have no rule left after the switch: only the
        // return path will find their sockets, so it is looked up from before the switch.
        return_path.rules_changing();
        if !*return_path_lookup {
            classifier.set_return_path_lookup(true)?;
            *return_path_lookup = true;
            report::log_return_path(return_path.needed());
        }
        let added = pending.keys();
        let switched = async {
            routing.add(&marks(&rules)).await?;
            listeners.start(classifier, pending)?;
            classifier.install_rules(&rules, &compiled)?;
            Ok::<(), AgentError>(())
        }
        .await;
        if let Err(e) = switched {
            roll_back(routing, listeners, &added, in_force).await;
            return Err(e);
        }
        // The new rules are in force from here on: what fails now is reported, not undone.
        if let Err(e) = classifier.set_config(global_config(
            &rules,
            args.outbound_mark,
            local.as_ref(),
            *return_path_lookup,
        )) {
            error!(
                "reload: the new rules are in force but the return-path mark was not updated: {}",
                error_chain(&e)
            );
        }

        // Retire the old generation once every classifier run that read its number is over.
        if let Err(e) = tokio::task::spawn_blocking(generation::wait_for_readers).await {
            warn!("reload: waiting for the classifier's readers: {e}");
            tokio::time::sleep(generation::FALLBACK_WAIT).await;
        }
        if let Err(e) = classifier.retire_previous() {
            warn!(
                "reload: clearing the old rule tables (retried on the next reload): {}",
                error_chain(&e)
            );
        }
        if let Err(e) = routing.install(&marks(&rules)).await {
            warn!(
                "reload: removing the old rules' routes: {}",
                error_chain(&e)
            );
        }
        listeners.close(&obsolete).await;
        report::log_rules(&rules);
        info!("reloaded: {} rule(s) in force", rules.len());
        Ok(rules)
    }
}

/// Undoes what a reload added before its switch failed: the new listeners (closing one
/// also takes it out of the sockmap) and the new rules' routes. The classifier still
/// holds the rules in force.
async fn roll_back(
    routing: &mut PolicyRouting,
    listeners: &mut Listeners,
    added: &Keys,
    in_force: &[Rule],
) {
    listeners.close(added).await;
    if let Err(undo) = routing.install(&marks(in_force)).await {
        warn!(
            "reload: removing the new rules' routes: {}",
            error_chain(&undo)
        );
    }
}
