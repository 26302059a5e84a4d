//! The cluster's keeper, in the scheduler job, for the life of the
//! cluster: it holds the size the user recorded (`target.json`: a number of
//! worker jobs, or dask's adaptive target between a minimum and a maximum),
//! replaces lost workers, submits walltime successors ahead of time, and
//! retires extra workers through dask before cancelling their jobs. In
//! every cluster, kept or not, it removes from the scheduler the workers of
//! jobs that Slurm no longer runs (a node lost with its connections half
//! open), so that dask recomputes their results at once.
//!
//! Who owns what: every decision is a pure function of `decide`; Slurm is
//! reached through `crate::slurm` (plain sbatch, squeue, scancel, the
//! same policy path as any submission); the records are
//! `dask_spank_common::records`; the only Python is the dask helper
//! (`helper`), a client of the scheduler that reports the connected workers
//! and dask's adaptive target and retires workers when told.
//!
//! Every `interval` the keeper asks squeue for the cluster's worker jobs
//! and decides; it writes what it saw in `keeper.json` (for `status`) and
//! one line per decision in the scheduler job's log. A settled cluster
//! (`decide::quiet`: nothing pending, leaving or short, and nothing moved
//! since) is asked about every `decide::STEADY_S` only: an squeue is three
//! RPCs to slurmctld, and a site runs many clusters all day. The helper's
//! state (every `tick`) goes to `connected.json`.
//!
//! Pools: the keeper keeps each worker pool that has a target (the default
//! pool's `target.json`, `pools/<pool>/target.json`) on its own: its jobs
//! (told by their job name), its target or adaptive range, its submission
//! options, its refusals' backoff. One squeue serves all pools; a retirement
//! through dask holds every pool until it is done (it is one order to the
//! helper, seconds long). The default pool's `down` ends the keeping of all.

pub mod decide;
pub mod helper;

use crate::slurm;
use dask_spank_common::names::PoolName;
use dask_spank_common::paths::{layout, vars, TlsFiles};
use dask_spank_common::records::{
    now, ClusterDir, Connected, KeeperStatus, PoolKeeperStatus, Target, WorkerArgs,
};
use dask_spank_common::ClusterName;
use decide::{Backoff, LastStep, QueueState, Rules, Seen, Step, WorkerJob};
use helper::{Event, Helper, SchedulerView};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio::time::Instant;

/// How long retiring workers get to hand their data over before their
/// jobs are cancelled anyway.
const RETIRE_TIMEOUT: Duration = Duration::from_secs(60);

/// A line of the keeper in the scheduler job's log (its stdout).
pub fn say(msg: &str) {
    let ts = humantime::format_rfc3339_seconds(SystemTime::now());
    println!("{ts} dask-spank[keeper]: {msg}");
}

fn env_secs(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Where the keeper's dask helper connects: the scheduler's address and
/// the cluster's TLS credentials (once they exist).
pub fn connect_order(address: &str, tls: &TlsFiles) -> serde_json::Value {
    let (ca, cert, key) = if tls.all_exist() {
        (
            Some(tls.ca.clone()),
            Some(tls.cert.clone()),
            Some(tls.key.clone()),
        )
    } else {
        (None, None, None)
    };
    serde_json::json!({"connect": {"address": address, "ca": ca, "cert": cert, "key": key}})
}

/// What the keeper remembers of a pool between steps.
#[derive(Default)]
struct PoolKeep {
    /// Intervals its adaptive target was low (`decide::want`).
    low: u32,
    backoff: Backoff,
}

pub struct Keeper {
    cluster: ClusterName,
    dir: ClusterDir,
    started: SystemTime,
    rules: Rules,
    interval: Duration,
    helper: Helper,
    /// The helper's last view, and the last error it reported.
    view: Option<SchedulerView>,
    last_error: Option<String>,
    /// Each pool's adaptive count and refusals (None: the default pool).
    pools: BTreeMap<Option<PoolName>, PoolKeep>,
    /// Jobs to cancel once dask has retired their workers (or at the
    /// deadline).
    retiring: Option<(Vec<String>, Instant)>,
    /// Workers whose jobs stopped running (their node lost).
    lost: decide::LostWatch,
    /// The last step that asked squeue (None: none yet, or it failed).
    last: Option<LastStep>,
}

impl Keeper {
    pub fn new(cluster: ClusterName, dir: ClusterDir) -> Keeper {
        let interval = std::env::var("DASK_SPANK_KEEPER_INTERVAL")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| *v > 0.0)
            .unwrap_or(5.0);
        let helper = Helper::new(dir.path(), layout::KEEPER_HELPER, interval.min(2.0));
        Keeper {
            cluster,
            started: SystemTime::now(),
            rules: Rules {
                lead_s: env_secs(vars::SUCCESSOR_LEAD, 600),
                margin_s: env_secs(vars::LIFETIME_MARGIN, 300),
            },
            interval: Duration::from_secs_f64(interval),
            helper,
            view: None,
            last_error: None,
            pools: BTreeMap::new(),
            retiring: None,
            lost: Default::default(),
            last: None,
            dir,
        }
    }

    /// Keep the cluster until `down` (then it returns); `connect` is where
    /// the helper connects (the scheduler's address, once known).
    pub async fn run(mut self, mut connect: watch::Receiver<Option<serde_json::Value>>) {
        say(&format!(
            "keeping cluster {} (successors {}s ahead of a worker's retirement)",
            self.cluster, self.rules.lead_s
        ));
        let mut step_at = Instant::now();
        loop {
            let start_in = Duration::from_secs(self.helper.start_at().saturating_sub(now()));
            let retire_deadline = self.retiring.as_ref().map(|(_, t)| *t);
            tokio::select! {
                ev = self.helper.event() => self.on_event(ev).await,
                _ = tokio::time::sleep(start_in), if !self.helper.is_running() => {
                    let order = connect.borrow().clone();
                    self.start_helper(order).await;
                }
                changed = connect.changed() => match changed {
                    Ok(()) => {
                        let order = connect.borrow().clone();
                        if let Some(o) = order {
                            self.helper.send(&o).await;
                        }
                    }
                    Err(_) => break,
                },
                _ = tokio::time::sleep_until(retire_deadline.unwrap_or(step_at)), if retire_deadline.is_some() => {
                    self.cancel_retired().await;
                }
                _ = tokio::time::sleep_until(step_at) => {
                    step_at = Instant::now() + self.interval;
                    if self.step().await {
                        say("the cluster is going down: keeping no more");
                        break;
                    }
                }
            }
        }
        self.helper.stop().await;
    }

    async fn start_helper(&mut self, connect: Option<serde_json::Value>) {
        match self.helper.start() {
            Ok(pid) => {
                if self.helper.status.restarts > 0 {
                    say(&format!("its dask helper started again (pid {pid})"));
                }
                if let Some(o) = connect {
                    self.helper.send(&o).await;
                }
            }
            Err(e) => say(&format!(
                "cannot start its dask helper ({e}); the cluster is not fully kept"
            )),
        }
        self.write_status(None);
    }

    async fn on_event(&mut self, ev: Event) {
        match ev {
            Event::View(v) => {
                let names = v.workers.keys().cloned().collect();
                let _ = self.dir.write_connected(&Connected {
                    workers: names,
                    updated: now(),
                });
                let changed = self.fresh_view().map(|o| o.workers.len()) != Some(v.workers.len());
                self.view = Some(v);
                self.last_error = None;
                // `status` shows the keeper's count beside connected.json's:
                // the same number, not the last step's.
                if changed {
                    self.write_status(None);
                }
            }
            Event::Retired => self.cancel_retired().await,
            Event::Error(e) => {
                if self.last_error.as_deref() != Some(e.as_str()) {
                    say(&format!("its dask helper: {e}"));
                }
                self.last_error = Some(e);
            }
            Event::Died(how) => {
                say(&format!(
                    "its dask helper died ({how}); meanwhile the cluster is kept from the queue alone"
                ));
                self.view = None;
                self.write_status(None);
            }
        }
    }

    /// The helper's view, if it is recent (three of its ticks).
    fn fresh_view(&self) -> Option<&SchedulerView> {
        let max_age = (3.0 * self.interval.as_secs_f64().min(2.0)).ceil() as u64 + 1;
        self.view
            .as_ref()
            .filter(|v| now().saturating_sub(v.at) <= max_age)
    }

    /// One decision. Whether the cluster is going down.
    async fn step(&mut self) -> bool {
        let target = match self.dir.target() {
            // Only a `down` of this cluster stops the keeper; one from
            // before it started is a past cluster's: no target then.
            Some(Target::Down { .. }) => {
                return self.dir.target_mtime().is_some_and(|t| t >= self.started)
            }
            t => t,
        };
        let seen = self.seen(&target);
        let quiet = match (&self.last, &seen) {
            (Some(last), Some(seen)) => {
                decide::quiet(self.rules, last, seen, now(), self.interval.as_secs())
            }
            _ => false,
        };
        if quiet {
            self.write_status(None);
            return false;
        }
        self.last = None;
        // Every cluster's, kept or not: its lost workers leave the scheduler.
        let Some(jobs) = self.worker_jobs().await else {
            return false;
        };
        let lost_watched = self.remove_lost(&jobs).await;
        let Some(target) = target else {
            self.remember(seen, jobs, lost_watched);
            return false;
        };
        let mut status = None;
        let mut others = BTreeMap::new();
        let (mut retire, mut cancel) = (vec![], vec![]);
        let mut settled = !lost_watched;
        let pools = std::iter::once(None).chain(self.dir.pools().into_iter().map(Some));
        for pool in pools {
            // A pool without a target (its jobs submitted by hand) is not kept.
            let Some(t) = pool
                .as_ref()
                .map_or(Some(target.clone()), |p| self.dir.target_of(Some(p)))
            else {
                continue;
            };
            let (step, s) = self.pool_step(pool.as_ref(), t, &jobs);
            // (An adaptive pool counting intervals of a lower demand is
            // on its way down: `low` must go on counting every interval.)
            let lowering = self.pools.get(&pool).is_some_and(|k| k.low > 0);
            settled &= step == Step::Hold
                && s.target == s.running
                && s.pending == 0
                && s.retiring == 0
                && s.short_reason.is_none()
                && !lowering;
            match step {
                Step::Hold => {}
                Step::Grow { n, why } => self.grow(pool.as_ref(), n, why).await,
                Step::Shrink {
                    retire: r,
                    cancel: c,
                } => {
                    retire.extend(r);
                    cancel.extend(c);
                }
            }
            match pool {
                None => status = Some(s),
                Some(p) => {
                    others.insert(p.to_string(), s);
                }
            }
        }
        self.shrink(retire, cancel).await;
        if let Some(s) = status {
            self.write_status(Some(keeper_status(s, others)));
        }
        self.remember(seen, jobs, !settled);
        false
    }

    /// What a step sees besides the queue (None: no fresh word from the
    /// helper, so nothing tells whether anything moved).
    fn seen(&self, target: &Option<Target>) -> Option<Seen> {
        let view = self.fresh_view()?;
        let pools = self.dir.pools().into_iter().map(|p| {
            let t = self.dir.target_of(Some(&p));
            (Some(p), t)
        });
        Some(Seen::new(
            std::iter::once((None, target.clone()))
                .chain(pools)
                .collect(),
            view.workers.keys().cloned().collect(),
            view.demand.clone(),
        ))
    }

    /// Remember a step that asked squeue, for `decide::quiet`; `busy`: it
    /// left something in motion (then the next step asks again anyway).
    fn remember(&mut self, seen: Option<Seen>, jobs: Vec<WorkerJob>, busy: bool) {
        self.last = seen.map(|seen| LastStep {
            seen,
            jobs,
            at: now(),
            settled: !busy && self.retiring.is_none(),
        });
    }

    /// One pool's decision (None: the default pool), from its target and
    /// the cluster's jobs; and what the keeper saw of it.
    fn pool_step(
        &mut self,
        pool: Option<&PoolName>,
        target: Target,
        all: &[WorkerJob],
    ) -> (Step, PoolKeeperStatus) {
        let jobs: Vec<WorkerJob> = all
            .iter()
            .filter(|j| j.pool.as_ref() == pool)
            .cloned()
            .collect();
        let counts = decide::count(self.rules, &jobs);
        let resources = match pool {
            Some(_) => self
                .dir
                .worker_args_of(pool)
                .map(|a| a.resources)
                .unwrap_or_default(),
            None => vec![],
        };
        let view = self.fresh_view().cloned();
        let adaptive = view.as_ref().map(|v| match pool {
            None => decide::default_demand(&v.demand),
            Some(_) => decide::pool_demand(&resources, &v.demand),
        });
        let keep = self.pools.entry(pool.cloned()).or_default();
        let want = decide::want(&target, counts.active(), adaptive, &mut keep.low);
        let step = match want {
            Some(w) if self.retiring.is_none() => decide::step(
                self.cluster.as_str(),
                w,
                counts,
                &jobs,
                view.as_ref().map(|v| &v.workers),
                keep.backoff.allows(now()),
            ),
            _ => Step::Hold,
        };
        let connected = view.as_ref().map_or(0, |v| {
            decide::connected(self.cluster.as_str(), &jobs, &v.workers)
        });
        let status = PoolKeeperStatus {
            target: want.unwrap_or(counts.active()),
            intention: target,
            pending: counts.waiting,
            running: counts.running,
            retiring: counts.retiring,
            connected,
            short_reason: keep.backoff.short.clone(),
        };
        (step, status)
    }

    /// The cluster's worker jobs, as squeue shows them (None: squeue did
    /// not answer; nothing is decided on no news).
    async fn worker_jobs(&self) -> Option<Vec<WorkerJob>> {
        let cluster = self.cluster.to_string();
        match tokio::task::spawn_blocking(move || slurm::worker_jobs(&cluster)).await {
            Ok(Ok(q)) => Some(
                q.into_iter()
                    .map(|k| WorkerJob {
                        label: k.label,
                        // Parsed by slurm::parse_kept already.
                        pool: k.pool.and_then(|p| p.parse().ok()),
                        state: QueueState::from_squeue(&k.state),
                        limit_s: k.limit_s,
                        used_s: k.used_s,
                    })
                    .collect(),
            ),
            Ok(Err(e)) => {
                say(&format!("cannot see the worker jobs this time: {e}"));
                None
            }
            Err(_) => None,
        }
    }

    /// Remove from the scheduler the workers whose jobs Slurm no longer
    /// runs (see `decide::LOST_GRACE_S`): dask recomputes what they held
    /// now, not after its worker-ttl. Whether any is still watched (or
    /// removed now): then the keeper keeps asking every interval.
    async fn remove_lost(&mut self, jobs: &[WorkerJob]) -> bool {
        let Some(workers) = self.fresh_view().map(|v| v.workers.clone()) else {
            return false;
        };
        let lost = self
            .lost
            .observe(self.cluster.as_str(), jobs, &workers, now());
        let watched = self.lost.watching();
        if lost.is_empty() || !self.helper.is_running() {
            return watched;
        }
        let (labels, addresses): (Vec<String>, Vec<String>) = lost.into_iter().unzip();
        say(&format!(
            "removing from the scheduler the workers of jobs {} (Slurm no longer runs them: \
             their node lost?); dask recomputes what they held",
            labels.join(", ")
        ));
        self.helper
            .send(&serde_json::json!({ "remove": addresses }))
            .await;
        true
    }

    /// Retire these workers through dask, then cancel these jobs (of
    /// every pool: one order to the helper).
    async fn shrink(&mut self, retire: Vec<String>, cancel: Vec<String>) {
        if retire.is_empty() || !self.helper.is_running() {
            cancel_jobs(cancel).await;
        } else {
            self.helper
                .send(&serde_json::json!({ "retire": retire }))
                .await;
            self.retiring = Some((cancel, Instant::now() + RETIRE_TIMEOUT));
        }
    }

    /// Cancel the jobs whose workers dask retired (or had the time to).
    async fn cancel_retired(&mut self) {
        if let Some((labels, _)) = self.retiring.take() {
            cancel_jobs(labels).await;
        }
    }

    /// Submit `k` worker jobs of `pool`, halving a refused batch (see
    /// `decide::batches`).
    async fn grow(&mut self, pool: Option<&PoolName>, k: u32, why: String) {
        let shape = self.dir.worker_args_of(pool).unwrap_or_else(|| WorkerArgs {
            args: vec![
                "--dask-role=worker".into(),
                format!("--dask-cluster={}", self.cluster),
            ],
            ..Default::default()
        });
        let base = decide::pool_args(pool, shape.args);
        let of = pool.map(|p| format!(" of pool {p}")).unwrap_or_default();
        let mut env = slurm::clean_env();
        env.extend(shape.env);
        let (mut got, mut err) = (0, String::new());
        for n in decide::batches(k) {
            // First: options after a job script would be the script's.
            let mut args = vec![format!("--array=1-{n}")];
            args.extend(base.iter().cloned());
            let env = env.clone();
            match tokio::task::spawn_blocking(move || slurm::sbatch_in(&args, Some(&env))).await {
                Ok(Ok(id)) => {
                    let s = if n > 1 { "s" } else { "" };
                    say(&format!(
                        "submitted {n} worker job{s}{of} (array {id}): {why}"
                    ));
                    got = n;
                    break;
                }
                Ok(Err(e)) => err = e,
                Err(e) => err = e.to_string(),
            }
        }
        let backoff = &mut self.pools.entry(pool.cloned()).or_default().backoff;
        if let Some(delay) = backoff.record(k, got, &err, now()) {
            let short = backoff.short.clone().unwrap_or_default();
            say(&format!("{short}{of}; retrying in {delay}s"));
        }
    }

    /// Write `keeper.json`: `status` of this step, or the last one's with
    /// the helper's news.
    fn write_status(&mut self, status: Option<KeeperStatus>) {
        let Some(mut s) = status.or_else(|| self.dir.keeper()) else {
            return;
        };
        s.helper = self.helper.status.clone();
        // Why each pool is short, as of its last submission (this step's).
        let short = |p: Option<PoolName>| self.pools.get(&p).and_then(|k| k.backoff.short.clone());
        s.default.short_reason = short(None);
        for (name, p) in s.pools.iter_mut() {
            p.short_reason = short(name.parse().ok());
        }
        // Between steps, the helper's news: those connected of each pool's
        // jobs as the last step saw them are not known here; the default
        // pool's count is all connected less the other pools'.
        if let Some(v) = self.fresh_view() {
            let others: u32 = s.pools.values().map(|p| p.connected).sum();
            s.default.connected = (v.workers.len() as u32).saturating_sub(others);
        }
        s.updated = now();
        let _ = self.dir.write_keeper(&s);
    }
}

/// The keeper's record: the default pool's `status`, the others'.
fn keeper_status(s: PoolKeeperStatus, pools: BTreeMap<String, PoolKeeperStatus>) -> KeeperStatus {
    KeeperStatus {
        default: s,
        helper: Default::default(),
        updated: 0,
        pools,
    }
}

async fn cancel_jobs(labels: Vec<String>) {
    if labels.is_empty() {
        return;
    }
    let n = labels.len();
    let ids = labels.join(" ");
    let env = slurm::clean_env();
    let _ = tokio::task::spawn_blocking(move || slurm::scancel_in(&labels, &env)).await;
    let s = if n > 1 { "s" } else { "" };
    say(&format!(
        "cancelled {n} worker job{s} ({ids}): more than the target"
    ));
}

/// The scheduler job ends (scancel, time limit, a failed scheduler): the
/// worker jobs of a kept cluster end with it (a pending successor would
/// otherwise start for a scheduler that is gone). A cluster without a
/// target (plain sbatch) keeps its workers, which leave by their death
/// timeout; `down` cancels them itself.
pub fn end_of_cluster(cluster: &ClusterName, dir: &ClusterDir) {
    if !dir.is_kept() {
        return;
    }
    match slurm::scancel_workers(cluster.as_str(), &dir.pools(), Duration::from_secs(5)) {
        Ok(()) => eprintln!(
            "dask-spank: the scheduler job ends: its cluster's worker jobs were cancelled (successors included)"
        ),
        Err(e) => eprintln!(
            "dask-spank: the scheduler job ends: cannot cancel its cluster's worker jobs ({e}); \
             they leave after their death timeout"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use decide::{Demand, Worker};

    /// A keeper of cluster `ana` on a fresh directory.
    fn keeper(tag: &str) -> Keeper {
        let dir = std::env::temp_dir().join(format!("dsp-keep-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Keeper::new("ana".parse().unwrap(), ClusterDir(dir))
    }

    fn job(label: &str, pool: Option<&str>, state: QueueState) -> WorkerJob {
        WorkerJob {
            label: label.into(),
            pool: pool.map(|p| p.parse().unwrap()),
            state,
            limit_s: None,
            used_s: 0,
        }
    }

    /// The helper's view now: these dask workers (by name), this demand.
    fn view(workers: &[&str], demand: Demand) -> SchedulerView {
        let workers = workers
            .iter()
            .map(|w| {
                let address = format!("tcp://{w}:1");
                (w.to_string(), Worker { address, keys: 0 })
            })
            .collect();
        SchedulerView {
            workers,
            demand,
            at: now(),
        }
    }

    fn jobs() -> Vec<WorkerJob> {
        vec![
            job("10_1", None, QueueState::Running),
            job("10_2", None, QueueState::Waiting),
            job("11_1", Some("gpu"), QueueState::Running),
        ]
    }

    #[test]
    fn a_fixed_target_grows_by_its_own_pools_shortfall() {
        let mut k = keeper("fixed");
        let four = Target::Workers { workers: 4 };
        let (step, s) = k.pool_step(None, four.clone(), &jobs());
        let why = "target 4, 2 active".to_string();
        assert_eq!(step, Step::Grow { n: 2, why });
        let want = PoolKeeperStatus {
            target: 4,
            intention: four.clone(),
            pending: 1,
            running: 1,
            retiring: 0,
            connected: 0,
            short_reason: None,
        };
        assert_eq!(s, want);
        // The gpu pool at 0: its running worker is retired through dask,
        // but only once the helper lists it.
        let gpu: PoolName = "gpu".parse().unwrap();
        let zero = Target::Workers { workers: 0 };
        let (step, _) = k.pool_step(Some(&gpu), zero.clone(), &jobs());
        assert_eq!(step, Step::Hold);
        k.view = Some(view(&["ana-11_1", "ana-10_1"], Demand::default()));
        let (step, s) = k.pool_step(Some(&gpu), zero.clone(), &jobs());
        let retire = vec!["tcp://ana-11_1:1".to_string()];
        let cancel = vec!["11_1".to_string()];
        assert_eq!(step, Step::Shrink { retire, cancel });
        assert_eq!((s.target, s.running, s.connected), (0, 1, 1));
        // While a retirement is under way, every pool holds.
        k.retiring = Some((vec!["12_1".into()], Instant::now()));
        assert_eq!(k.pool_step(None, four, &jobs()).0, Step::Hold);
        assert_eq!(k.pool_step(Some(&gpu), zero, &jobs()).0, Step::Hold);
    }

    #[test]
    fn an_adaptive_target_waits_for_the_helpers_word_then_follows_its_demand() {
        let mut k = keeper("adapt");
        let range = Target::Adapt { adapt: [1, 10] };
        let (step, s) = k.pool_step(None, range.clone(), &jobs());
        assert_eq!(step, Step::Hold);
        assert_eq!(s.target, 2, "no word yet: what it has");
        let demand = Demand {
            adaptive_target: 5,
            ..Default::default()
        };
        k.view = Some(view(&[], demand));
        let (step, _) = k.pool_step(None, range, &jobs());
        assert!(matches!(step, Step::Grow { n: 3, .. }), "{step:?}");
        // A pool is sized by the tasks asking for its resources.
        let gpu: PoolName = "gpu".parse().unwrap();
        let args = WorkerArgs {
            resources: vec![("GPU".into(), 1.0)],
            ..Default::default()
        };
        k.dir.write_worker_args_of(Some(&gpu), &args).unwrap();
        let demand = Demand {
            adaptive_target: 5,
            resources: [("GPU".to_string(), 3.0)].into(),
            ..Default::default()
        };
        k.view = Some(view(&[], demand));
        let range = Target::Adapt { adapt: [0, 8] };
        let (step, _) = k.pool_step(Some(&gpu), range, &jobs());
        assert!(matches!(step, Step::Grow { n: 2, .. }), "{step:?}");
    }

    #[test]
    fn an_old_view_of_the_helper_is_no_view() {
        let mut k = keeper("fresh");
        k.view = Some(view(&["ana-10_1"], Demand::default()));
        assert!(k.fresh_view().is_some());
        // The interval's default is 5 s: the helper ticks every 2 s, and
        // three ticks and a second are 7 s (6: a second may pass here).
        k.view.as_mut().unwrap().at = now() - 6;
        assert!(k.fresh_view().is_some());
        k.view.as_mut().unwrap().at = now() - 9;
        assert!(k.fresh_view().is_none());
    }

    fn pool_status(connected: u32) -> PoolKeeperStatus {
        PoolKeeperStatus {
            target: 2,
            intention: Target::Workers { workers: 2 },
            pending: 0,
            running: 2,
            retiring: 0,
            connected,
            short_reason: None,
        }
    }

    #[test]
    fn the_status_between_steps_has_the_helpers_count_and_each_pools_refusal() {
        let mut k = keeper("status");
        let others = [("gpu".to_string(), pool_status(1))].into();
        k.write_status(Some(keeper_status(pool_status(0), others)));
        let gpu: PoolName = "gpu".parse().unwrap();
        let refused = k.pools.entry(Some(gpu)).or_default();
        refused
            .backoff
            .record(2, 0, "QOSMaxSubmitJobPerUserLimit", now());
        k.helper.status.restarts = 3;
        k.view = Some(view(&["a", "b", "c"], Demand::default()));
        k.write_status(None);
        let s = k.dir.keeper().unwrap();
        assert_eq!(s.default.connected, 2, "all connected but the gpu pool's");
        assert_eq!(s.default.short_reason, None);
        assert_eq!(
            s.pools["gpu"].short_reason.as_deref(),
            Some("sbatch refused 2 of 2 worker jobs: QOSMaxSubmitJobPerUserLimit")
        );
        assert_eq!(s.helper.restarts, 3);
        assert!(now().saturating_sub(s.updated) <= 1);
    }

    #[tokio::test]
    async fn the_helpers_view_is_recorded_and_its_death_forgets_it() {
        let mut k = keeper("events");
        k.write_status(Some(keeper_status(pool_status(0), BTreeMap::new())));
        let v = view(&["ana-10_1", "ana-10_2"], Demand::default());
        k.on_event(Event::View(v.clone())).await;
        assert_eq!(k.view, Some(v));
        let c = std::fs::read(k.dir.path().join(layout::CONNECTED)).unwrap();
        let c: Connected = serde_json::from_slice(&c).unwrap();
        assert_eq!(c.workers, ["ana-10_1", "ana-10_2"]);
        assert_eq!(k.dir.keeper().unwrap().default.connected, 2);
        k.on_event(Event::Error("no scheduler".into())).await;
        assert_eq!(k.last_error.as_deref(), Some("no scheduler"));
        k.on_event(Event::Died("exit status 1".into())).await;
        assert_eq!(k.view, None);
    }

    #[tokio::test]
    async fn only_a_down_recorded_since_the_keeper_started_stops_it() {
        let mut k = keeper("down");
        k.dir.write_target(&Target::Down { down: true }).unwrap();
        assert!(k.step().await, "this cluster's down");
        // A down older than the keeper is a past cluster's of the name.
        k.started = SystemTime::now() + Duration::from_secs(3600);
        assert!(!k.step().await);
    }

    #[test]
    fn the_helper_connects_with_the_credentials_once_all_exist() {
        let k = keeper("connect");
        let tls = dask_spank_common::paths::tls_files(k.dir.path());
        let plain = serde_json::json!({"connect": {
            "address": "tls://n1:1", "ca": null, "cert": null, "key": null}});
        assert_eq!(connect_order("tls://n1:1", &tls), plain);
        for f in [&tls.ca, &tls.cert] {
            std::fs::write(f, "x").unwrap();
        }
        assert_eq!(connect_order("tls://n1:1", &tls), plain, "no key yet");
        std::fs::write(&tls.key, "x").unwrap();
        let order = connect_order("tls://n1:1", &tls);
        assert_eq!(order["connect"]["key"], serde_json::json!(tls.key));
        assert_eq!(order["connect"]["ca"], serde_json::json!(tls.ca));
        assert_eq!(order["connect"]["cert"], serde_json::json!(tls.cert));
    }
}
