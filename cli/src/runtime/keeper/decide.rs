//! The keeper's decisions, as pure functions of what it observed: how many
//! worker jobs the cluster wants, which running workers are retiring for
//! their walltime (their successors due), what to submit or cancel and
//! which workers to retire first, how a refused submission is retried, and
//! when a dead helper is started again. Nothing here talks to Slurm, dask
//! or the clock: the keeper (`super`) observes and acts.

use dask_spank_common::names::PoolName;
use dask_spank_common::policy::worker_lifetime_s;
use dask_spank_common::records::Target;
use dask_spank_common::slurm_state::SlurmState;
use std::collections::BTreeMap;

/// dask's Adaptive waits this many intervals of a lower target before it
/// scales down; so does the keeper.
pub const WAIT_COUNT: u32 = 3;
/// First delay after a refused submission, and its cap.
pub const BACKOFF_FIRST_S: u64 = 10;
pub const BACKOFF_MAX_S: u64 = 300;
/// A dead helper is started again after 1 s, doubling with each death
/// within `HELPER_WINDOW_S`, up to `HELPER_MAX_S`.
pub const HELPER_FIRST_S: u64 = 1;
pub const HELPER_MAX_S: u64 = 60;
pub const HELPER_WINDOW_S: u64 = 60;

/// The site's rules the keeper applies (from the job's environment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Submit a successor this long before its predecessor retires.
    pub lead_s: u64,
    /// Workers retire this long before their walltime (`worker_lifetime_s`).
    pub margin_s: u64,
}

/// A worker job in the queue, as squeue shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerJob {
    /// `1234_5` or `1234`.
    pub label: String,
    /// Its pool, by its job name (None: the default pool).
    pub pool: Option<PoolName>,
    pub state: QueueState,
    /// Its time limit (None: unlimited).
    pub limit_s: Option<u64>,
    /// How long it has run.
    pub used_s: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueState {
    /// Pending or configuring: on its way.
    Waiting,
    Running,
    /// Completing, or anything else: on its way out.
    Leaving,
}

impl QueueState {
    pub fn from_squeue(s: &SlurmState) -> QueueState {
        match s {
            SlurmState::Pending | SlurmState::Configuring => QueueState::Waiting,
            SlurmState::Running => QueueState::Running,
            SlurmState::Completing | SlurmState::Other(_) => QueueState::Leaving,
        }
    }
}

/// A worker connected to the scheduler, as the helper sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    pub address: String,
    /// Keys it holds in memory: the fewest are retired first.
    pub keys: u64,
}

/// Whether it is time to submit the successor of a running worker: `lead`
/// before it retires, but never in its first half-life (a successor due at
/// its own start would be succeeded at once, a chain of jobs where one
/// replacement was wanted).
pub fn successor_due(rules: Rules, limit_s: Option<u64>, used_s: u64) -> bool {
    let Some(limit) = limit_s else { return false };
    let life = worker_lifetime_s(limit, rules.margin_s);
    life.saturating_sub(used_s) < rules.lead_s.min(life / 2)
}

/// The cluster's worker jobs, counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub waiting: u32,
    pub running: u32,
    /// Running ones whose successor is due.
    pub retiring: u32,
}

impl Counts {
    /// Jobs that count towards the target: waiting and running, but those
    /// retiring (their successors take their place).
    pub fn active(&self) -> u32 {
        self.waiting + self.running - self.retiring
    }
}

pub fn count(rules: Rules, jobs: &[WorkerJob]) -> Counts {
    let mut c = Counts::default();
    for j in jobs {
        match j.state {
            QueueState::Waiting => c.waiting += 1,
            QueueState::Running => {
                c.running += 1;
                if successor_due(rules, j.limit_s, j.used_s) {
                    c.retiring += 1;
                }
            }
            QueueState::Leaving => {}
        }
    }
    c
}

/// How many worker jobs the cluster wants, or None to hold what it has (no
/// target, or an adaptive one whose scheduler said nothing yet). `low`
/// counts the intervals an adaptive target was below `active`: the keeper
/// shrinks only after `WAIT_COUNT` of them.
pub fn want(target: &Target, active: u32, adaptive: Option<u32>, low: &mut u32) -> Option<u32> {
    match target {
        Target::Workers { workers } => Some(*workers),
        Target::Down { .. } => None,
        Target::Adapt { adapt: [lo, hi] } => {
            let w = adaptive?.clamp(*lo, (*hi).max(*lo));
            if w < active {
                *low += 1;
                Some(if *low >= WAIT_COUNT { w } else { active })
            } else {
                *low = 0;
                Some(w)
            }
        }
    }
}

/// What the scheduler asks of the cluster's pools, as the helper reports
/// it: dask's own adaptive target (for all workers, by CPU occupancy and
/// tasks ready), and the tasks that ask for worker resources (`GPU`), on
/// a worker already (processing) or waiting for one (no-worker).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Demand {
    pub adaptive_target: u32,
    /// Tasks asking for any resource.
    pub restricted: u32,
    /// Each resource, summed over those tasks.
    pub resources: BTreeMap<String, f64>,
    /// Connected workers, and their threads.
    pub workers: u32,
    pub threads: u32,
}

/// dask's wanted size of a pool whose workers offer `resources`, before
/// its range: the workers that the asking tasks fill (`ceil(asked /
/// offered)`, the most of its resources). Those tasks can run nowhere
/// else, so they grow this pool and no other. A pool that offers no
/// resource cannot be told its tasks: it wants nothing (its minimum).
pub fn pool_demand(resources: &[(String, f64)], d: &Demand) -> u32 {
    resources
        .iter()
        .filter(|(_, offered)| *offered > 0.0)
        .map(|(r, offered)| {
            let asked = d.resources.get(r).copied().unwrap_or(0.0);
            (asked / offered).ceil().min(u32::MAX as f64) as u32
        })
        .max()
        .unwrap_or(0)
}

/// dask's wanted size of the default pool, before its range: the adaptive
/// target less the share of the tasks that ask for resources (those run in
/// the other pools). dask counts a task as one thread of work and divides
/// by the workers' threads; so is the share counted (a task a worker when
/// no worker is connected yet). An approximation: dask's target also
/// weighs tasks by their expected duration, which the share does not.
pub fn default_demand(d: &Demand) -> u32 {
    let share = if d.threads == 0 {
        d.restricted as u64
    } else {
        (d.restricted as u64 * d.workers as u64).div_ceil(d.threads as u64)
    };
    (d.adaptive_target as u64).saturating_sub(share) as u32
}

/// What to do this interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Hold,
    /// Submit this many worker jobs.
    Grow {
        n: u32,
        why: String,
    },
    /// Retire these workers through dask (their data moves first), then
    /// cancel these jobs.
    Shrink {
        retire: Vec<String>,
        cancel: Vec<String>,
    },
}

/// The step from `want` and the queue. `workers` is the helper's view
/// (None while it is down: only waiting jobs are cancelled then, a running
/// worker is never cut off without dask moving its data); `retry` whether
/// a refused submission may be retried now.
pub fn step(
    cluster: &str,
    want: u32,
    counts: Counts,
    jobs: &[WorkerJob],
    workers: Option<&BTreeMap<String, Worker>>,
    retry: bool,
) -> Step {
    let active = counts.active();
    if want > active && retry {
        let mut why = format!("target {want}, {active} active");
        if counts.retiring > 0 {
            why.push_str(&format!(
                " ({} retiring for their walltime)",
                counts.retiring
            ));
        }
        return Step::Grow {
            n: want - active,
            why,
        };
    }
    if want < active {
        let (retire, cancel) = choose_victims(cluster, jobs, workers, active - want);
        if !cancel.is_empty() {
            return Step::Shrink { retire, cancel };
        }
    }
    Step::Hold
}

/// Which `extra` jobs to cancel: waiting ones first, then running ones
/// whose workers hold the least data (retired through dask: their
/// addresses). A running job whose worker the helper does not list is
/// not cancelled.
pub fn choose_victims(
    cluster: &str,
    jobs: &[WorkerJob],
    workers: Option<&BTreeMap<String, Worker>>,
    extra: u32,
) -> (Vec<String>, Vec<String>) {
    let extra = extra as usize;
    let mut cancel: Vec<String> = jobs
        .iter()
        .filter(|j| j.state == QueueState::Waiting)
        .map(|j| j.label.clone())
        .take(extra)
        .collect();
    let mut retire = Vec::new();
    if let Some(workers) = workers {
        let mut running: Vec<(&WorkerJob, &Worker)> = jobs
            .iter()
            .filter(|j| j.state == QueueState::Running)
            .filter_map(|j| Some((j, workers.get(&worker_name(cluster, &j.label))?)))
            .collect();
        running.sort_by_key(|(j, w)| (w.keys, j.label.clone()));
        for (j, w) in running.into_iter().take(extra - cancel.len()) {
            retire.push(w.address.clone());
            cancel.push(j.label.clone());
        }
    }
    (retire, cancel)
}

/// How many of `jobs` have their worker connected (`workers`, by name).
/// Job labels are Slurm's ids, unique across pools: a worker's name says
/// its job, and the job its pool.
pub fn connected(cluster: &str, jobs: &[WorkerJob], workers: &BTreeMap<String, Worker>) -> u32 {
    jobs.iter()
        .filter(|j| workers.contains_key(&worker_name(cluster, &j.label)))
        .count() as u32
}

/// The sbatch options of a pool's next worker jobs, from its recorded
/// ones: without `--array` (the keeper sets its own), and with the pool's
/// `--dask-pool` first (the plugin names the jobs for it; after a job
/// script it would be the script's argument).
pub fn pool_args(pool: Option<&PoolName>, recorded: Vec<String>) -> Vec<String> {
    let mut args: Vec<String> = recorded
        .into_iter()
        .filter(|a| !a.starts_with("--array") && !a.starts_with("--dask-pool"))
        .collect();
    if let Some(p) = pool {
        args.insert(0, format!("--dask-pool={p}"));
    }
    args
}

/// The dask name of a worker job's worker (the agent names it so).
pub fn worker_name(cluster: &str, label: &str) -> String {
    format!("{cluster}-{label}")
}

/// How long the scheduler may list a worker whose job Slurm no longer runs
/// before the keeper removes it there. A job that ends normally takes its
/// worker with it within seconds (the agent stops it, the worker says
/// goodbye); a worker still listed after this is on a node that was lost
/// with its connections half open (a hung or frozen node, a dropped
/// network): dask would wait for its worker-ttl (5 minutes by default)
/// before it recomputes what that worker held.
pub const LOST_GRACE_S: u64 = 15;

/// Workers whose jobs Slurm no longer runs, watched across steps.
#[derive(Debug, Default)]
pub struct LostWatch {
    /// Jobs seen running (only those: a worker the keeper never saw run,
    /// say one connected from elsewhere, is not its to judge).
    ran: std::collections::BTreeSet<String>,
    /// Since when a listed worker's job has not been running.
    gone_since: BTreeMap<String, u64>,
}

impl LostWatch {
    /// The addresses of the workers to remove from the scheduler now, with
    /// their jobs' labels: listed by the scheduler (`workers`, by name),
    /// their job seen running once, not running (ended, requeued, gone
    /// from the queue) for `LOST_GRACE_S`.
    pub fn observe(
        &mut self,
        cluster: &str,
        jobs: &[WorkerJob],
        workers: &BTreeMap<String, Worker>,
        now: u64,
    ) -> Vec<(String, String)> {
        let running: std::collections::BTreeSet<&str> = jobs
            .iter()
            .filter(|j| j.state == QueueState::Running)
            .map(|j| j.label.as_str())
            .collect();
        self.ran.extend(running.iter().map(|l| l.to_string()));
        let prefix = format!("{cluster}-");
        let mut listed = std::collections::BTreeSet::new();
        let mut lost = vec![];
        for (name, w) in workers {
            let Some(label) = name.strip_prefix(&prefix) else {
                continue;
            };
            listed.insert(label.to_string());
            if !self.ran.contains(label) || running.contains(label) {
                self.gone_since.remove(label);
                continue;
            }
            let since = *self.gone_since.entry(label.to_string()).or_insert(now);
            if now.saturating_sub(since) >= LOST_GRACE_S {
                lost.push((label.to_string(), w.address.clone()));
            }
        }
        // Forget what neither runs nor is listed any more.
        self.gone_since.retain(|l, _| listed.contains(l));
        self.ran
            .retain(|l| listed.contains(l) || running.contains(l.as_str()));
        lost
    }

    /// Whether a listed worker's job is not running (lost, or on its way
    /// out): watched until it leaves the scheduler or is removed.
    pub fn watching(&self) -> bool {
        !self.gone_since.is_empty()
    }
}

/// The sizes to try for `k` worker jobs: Slurm refuses a whole array that
/// would pass a queue limit (MaxSubmitJobs counts its tasks), so a refused
/// batch is tried at half its size, down to one job.
pub fn batches(k: u32) -> impl Iterator<Item = u32> {
    std::iter::successors((k > 0).then_some(k), |n| (*n > 1).then_some(n / 2))
}

/// Refused submissions: when to try again, and why the cluster is short.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    delay_s: u64,
    /// Not before this time (epoch seconds).
    retry_at: u64,
    pub short: Option<String>,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            delay_s: BACKOFF_FIRST_S,
            retry_at: 0,
            short: None,
        }
    }
}

impl Backoff {
    pub fn allows(&self, now: u64) -> bool {
        now >= self.retry_at
    }

    /// `got` of `asked` jobs were submitted at `now` (`err`: the last
    /// refusal). A full success resets; a partial one retries soon (the
    /// limit moves); none doubles the delay. The delay to report.
    pub fn record(&mut self, asked: u32, got: u32, err: &str, now: u64) -> Option<u64> {
        if got >= asked {
            *self = Backoff::default();
            return None;
        }
        self.short = Some(format!(
            "sbatch refused {} of {asked} worker jobs: {err}",
            asked - got
        ));
        let delay = self.delay_s;
        self.retry_at = now + delay;
        self.delay_s = if got > 0 {
            BACKOFF_FIRST_S
        } else {
            (delay * 2).min(BACKOFF_MAX_S)
        };
        Some(delay)
    }
}

/// How long to wait before starting a dead helper again, given when it
/// died before (epoch seconds, oldest first) and now.
pub fn helper_delay(deaths: &[u64], now: u64) -> u64 {
    let recent = deaths
        .iter()
        .filter(|&&t| now.saturating_sub(t) <= HELPER_WINDOW_S)
        .count() as u32;
    match recent {
        0 | 1 => HELPER_FIRST_S,
        n => (HELPER_FIRST_S << (n - 1).min(10)).min(HELPER_MAX_S),
    }
}

/// How long a quiet cluster goes without an squeue (see `quiet`): its
/// keeper then asks slurmctld twice a minute instead of every interval.
pub const STEADY_S: u64 = 30;

/// What the keeper saw besides the queue at a step: each pool's target
/// (None: the default pool) and the scheduler's workers and demand.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub targets: Vec<(Option<PoolName>, Option<Target>)>,
    pub workers: Vec<String>,
    pub demand: Demand,
}

impl Seen {
    /// What a step saw. dask's demand only moves an adaptive pool's size
    /// (`want`), so a cluster with none keeps none of it: on a scheduler
    /// too loaded to answer heartbeats in time (128 workers on 2 cores,
    /// its event loop held for seconds), dask's adaptive target of an idle
    /// cluster moves with the workers it would close, and each move asked
    /// slurmctld again for a cluster whose size is fixed.
    pub fn new(
        targets: Vec<(Option<PoolName>, Option<Target>)>,
        workers: Vec<String>,
        demand: Demand,
    ) -> Seen {
        let adaptive = targets
            .iter()
            .any(|(_, t)| matches!(t, Some(Target::Adapt { .. })));
        Seen {
            targets,
            workers,
            demand: if adaptive { demand } else { Demand::default() },
        }
    }
}

/// The last step that asked squeue: what it saw, the jobs, when, and
/// whether it left the cluster settled (every pool at its target with
/// all its jobs running, nothing submitted, retiring, cancelled or
/// watched as lost).
#[derive(Debug, Clone)]
pub struct LastStep {
    pub seen: Seen,
    pub jobs: Vec<WorkerJob>,
    pub at: u64,
    pub settled: bool,
}

/// Whether a step may skip squeue: the last one settled the cluster less
/// than `STEADY_S` ago, everything else it saw is unchanged (a target
/// written, a worker come or gone, dask's demand moved for an adaptive
/// cluster (Seen::new keeps it only there): each asks again),
/// and no running job's successor falls due before the next step. What
/// no one tells the keeper (a job ended on a lost node, its connections
/// half open) is then seen within `STEADY_S`, after Slurm's own
/// SlurmdTimeout. Polling every interval while nothing changes would be
/// an RPC load on slurmctld for every cluster of a site, all day long.
pub fn quiet(rules: Rules, last: &LastStep, seen: &Seen, now: u64, interval_s: u64) -> bool {
    let since = now.saturating_sub(last.at);
    last.settled
        && since < STEADY_S
        && *seen == last.seen
        && last.jobs.iter().all(|j| {
            j.state == QueueState::Running
                && !successor_due(rules, j.limit_s, j.used_s + since + interval_s)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squeue_states_are_waiting_running_or_leaving() {
        let of = |s: &str| QueueState::from_squeue(&SlurmState::parse(s));
        assert_eq!(of("PENDING"), QueueState::Waiting);
        assert_eq!(of("CONFIGURING"), QueueState::Waiting);
        assert_eq!(of("RUNNING"), QueueState::Running);
        for s in ["COMPLETING", "SUSPENDED", "CANCELLED", ""] {
            assert_eq!(of(s), QueueState::Leaving, "{s}");
        }
    }

    const RULES: Rules = Rules {
        lead_s: 600,
        margin_s: 300,
    };

    fn job(label: &str, state: QueueState, limit_s: Option<u64>, used_s: u64) -> WorkerJob {
        WorkerJob {
            label: label.into(),
            pool: None,
            state,
            limit_s,
            used_s,
        }
    }

    #[test]
    fn a_settled_cluster_skips_squeue_until_anything_moves_or_steady_s_passes() {
        let seen = Seen {
            targets: vec![(None, Some(Target::Workers { workers: 2 }))],
            workers: vec!["ana-7_1".into(), "ana-7_2".into()],
            demand: Demand::default(),
        };
        let jobs = vec![
            job("7_1", QueueState::Running, Some(7200), 100),
            job("7_2", QueueState::Running, None, 100),
        ];
        let last = LastStep {
            seen: seen.clone(),
            jobs: jobs.clone(),
            at: 1000,
            settled: true,
        };
        assert!(quiet(RULES, &last, &seen, 1005, 5));
        assert!(quiet(RULES, &last, &seen, 1000 + STEADY_S - 1, 5));
        assert!(
            !quiet(RULES, &last, &seen, 1000 + STEADY_S, 5),
            "asked again every STEADY_S"
        );
        let unsettled = LastStep {
            settled: false,
            ..last.clone()
        };
        assert!(!quiet(RULES, &unsettled, &seen, 1005, 5));
        // Anything that moved asks again.
        let mut moved = seen.clone();
        moved.workers.pop();
        assert!(!quiet(RULES, &last, &moved, 1005, 5), "a worker gone");
        let mut moved = seen.clone();
        moved.targets[0].1 = Some(Target::Workers { workers: 3 });
        assert!(!quiet(RULES, &last, &moved, 1005, 5), "a new target");
        // dask's demand, for an adaptive cluster only.
        let moved_demand = |target: Target| {
            let demand = Demand {
                adaptive_target: 4,
                ..Demand::default()
            };
            let seen = Seen::new(vec![(None, Some(target))], seen.workers.clone(), demand);
            let last = LastStep {
                seen: Seen::new(
                    seen.targets.clone(),
                    seen.workers.clone(),
                    Demand::default(),
                ),
                ..last.clone()
            };
            quiet(RULES, &last, &seen, 1005, 5)
        };
        assert!(
            !moved_demand(Target::Adapt { adapt: [1, 9] }),
            "dask's demand"
        );
        assert!(
            moved_demand(Target::Workers { workers: 2 }),
            "dask's demand, of a cluster of a fixed size"
        );
        // A job not running (on its way, or out) is watched every interval.
        for state in [QueueState::Waiting, QueueState::Leaving] {
            let mut waiting = last.clone();
            waiting.jobs[1].state = state;
            assert!(!quiet(RULES, &waiting, &seen, 1005, 5), "{state:?}");
        }
        // A successor due by the next step: 6300 s used makes one due.
        let mut near = last.clone();
        near.jobs[0].used_s = 6300 - 10;
        assert!(quiet(RULES, &near, &seen, 1005, 5));
        assert!(!quiet(RULES, &near, &seen, 1006, 5), "due by the next step");
    }

    #[test]
    fn successors_fall_due_a_lead_before_retirement_never_in_the_first_half_life() {
        // (limit, used, due): a 2 h job retires at 6900 s; due 600 s before.
        let cases = [
            (Some(7200), 0, false),
            (Some(7200), 6299, false),
            (Some(7200), 6301, true),
            (Some(7200), 9000, true),
            (None, 100_000, false),
            // A 1 min job lives 30 s: the lead is capped at 15 s.
            (Some(60), 14, false),
            (Some(60), 16, true),
        ];
        for (limit, used, due) in cases {
            assert_eq!(successor_due(RULES, limit, used), due, "{limit:?} {used}");
        }
    }

    #[test]
    fn counts_leave_out_retiring_and_leaving_jobs() {
        let jobs = [
            job("1_1", QueueState::Running, Some(7200), 7000),
            job("1_2", QueueState::Running, Some(7200), 10),
            job("1_3", QueueState::Waiting, Some(7200), 0),
            job("1_4", QueueState::Leaving, Some(7200), 7200),
        ];
        let c = count(RULES, &jobs);
        assert_eq!(
            c,
            Counts {
                waiting: 1,
                running: 2,
                retiring: 1
            }
        );
        assert_eq!(c.active(), 2);
    }

    #[test]
    fn wanted_sizes() {
        let fixed = Target::Workers { workers: 4 };
        let adapt = Target::Adapt { adapt: [1, 8] };
        let down = Target::Down { down: true };
        // (target, active, adaptive, low before) -> (want, low after)
        type Case<'a> = (&'a Target, u32, Option<u32>, u32, Option<u32>, u32);
        let cases: [Case; 9] = [
            (&fixed, 2, None, 0, Some(4), 0),
            (&down, 2, Some(9), 0, None, 0),
            (&adapt, 2, None, 0, None, 0),
            (&adapt, 2, Some(20), 1, Some(8), 0),
            (&adapt, 2, Some(0), 0, Some(2), 1),
            (&adapt, 2, Some(0), 1, Some(2), 2),
            (&adapt, 2, Some(0), 2, Some(1), 3),
            (&adapt, 0, Some(0), 0, Some(1), 0),
            (&adapt, 5, Some(5), 2, Some(5), 0),
        ];
        for (t, active, adaptive, low0, w, low1) in cases {
            let mut low = low0;
            assert_eq!(
                want(t, active, adaptive, &mut low),
                w,
                "{t:?} {active} {adaptive:?}"
            );
            assert_eq!(low, low1, "{t:?} {active} {adaptive:?}");
        }
    }

    fn workers(v: &[(&str, &str, u64)]) -> BTreeMap<String, Worker> {
        v.iter()
            .map(|(n, a, k)| {
                (
                    n.to_string(),
                    Worker {
                        address: a.to_string(),
                        keys: *k,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn grow_shrink_and_hold() {
        let jobs = [
            job("7_1", QueueState::Running, None, 0),
            job("7_2", QueueState::Running, None, 0),
            job("7_3", QueueState::Waiting, None, 0),
        ];
        let c = count(RULES, &jobs);
        let w = workers(&[("ana-7_1", "tls://a:1", 50), ("ana-7_2", "tls://a:2", 3)]);
        assert_eq!(
            step("ana", 5, c, &jobs, Some(&w), true),
            Step::Grow {
                n: 2,
                why: "target 5, 3 active".into()
            }
        );
        assert_eq!(
            step("ana", 5, c, &jobs, Some(&w), false),
            Step::Hold,
            "backing off"
        );
        assert_eq!(step("ana", 3, c, &jobs, Some(&w), true), Step::Hold);
        // The waiting job first, then the worker with the fewest keys.
        assert_eq!(
            step("ana", 1, c, &jobs, Some(&w), true),
            Step::Shrink {
                retire: vec!["tls://a:2".into()],
                cancel: vec!["7_3".into(), "7_2".into()]
            }
        );
        // Without the helper: waiting jobs only.
        assert_eq!(
            step("ana", 1, c, &jobs, None, true),
            Step::Shrink {
                retire: vec![],
                cancel: vec!["7_3".into()]
            }
        );
        let running = &jobs[..2];
        assert_eq!(
            step("ana", 0, count(RULES, running), running, None, true),
            Step::Hold
        );
    }

    #[test]
    fn a_retiring_worker_is_replaced_ahead_of_time() {
        let jobs = [
            job("8_1", QueueState::Running, Some(7200), 6500),
            job("8_2", QueueState::Running, Some(7200), 100),
        ];
        assert_eq!(
            step("ana", 2, count(RULES, &jobs), &jobs, None, true),
            Step::Grow {
                n: 1,
                why: "target 2, 1 active (1 retiring for their walltime)".into()
            }
        );
    }

    #[test]
    fn a_worker_whose_job_stopped_running_is_lost_after_the_grace_only() {
        let listed = workers(&[
            ("ana-7_1", "tls://a:1", 0),
            ("ana-7_2", "tls://b:1", 0),
            ("ana-x", "tls://c:1", 0),
        ]);
        let run = |l: &str| job(l, QueueState::Running, None, 0);
        let mut w = LostWatch::default();
        // Both running: nothing lost; ana-x's job never ran here.
        assert!(w
            .observe("ana", &[run("7_1"), run("7_2")], &listed, 100)
            .is_empty());
        // 7_2's node is lost: its job ends (NODE_FAIL, then gone), the
        // scheduler still lists its worker.
        let failed = job("7_2", QueueState::Leaving, None, 0);
        assert!(w
            .observe("ana", &[run("7_1"), failed.clone()], &listed, 105)
            .is_empty());
        assert!(w
            .observe("ana", &[run("7_1")], &listed, 105 + LOST_GRACE_S - 1)
            .is_empty());
        assert_eq!(
            w.observe("ana", &[run("7_1")], &listed, 105 + LOST_GRACE_S),
            vec![("7_2".to_string(), "tls://b:1".to_string())]
        );
        // Removed: forgotten.
        let left = workers(&[("ana-7_1", "tls://a:1", 0)]);
        assert!(w.observe("ana", &[run("7_1")], &left, 200).is_empty());
        assert!(w.gone_since.is_empty() && w.ran.len() == 1);
        // A job requeued (pending again) is not running either; running
        // again before the grace, it is not lost.
        let mut w = LostWatch::default();
        w.observe("ana", &[run("7_1")], &left, 0);
        let requeued = job("7_1", QueueState::Waiting, None, 0);
        assert!(w.observe("ana", &[requeued], &left, 1).is_empty());
        assert!(w
            .observe("ana", &[run("7_1")], &left, 1 + LOST_GRACE_S)
            .is_empty());
    }

    #[test]
    fn a_pool_grows_with_the_tasks_asking_for_its_resources_only() {
        let gpu = [("GPU".to_string(), 1.0)];
        let two = [("GPU".to_string(), 2.0), ("MEM".to_string(), 10.0)];
        let demand = |target, restricted, res: &[(&str, f64)], workers, threads| Demand {
            adaptive_target: target,
            restricted,
            resources: res.iter().map(|(r, a)| (r.to_string(), *a)).collect(),
            workers,
            threads,
        };
        // (demand) -> (gpu pool, two-gpu pool, default pool)
        let cases = [
            // Nothing to do.
            (demand(0, 0, &[], 2, 2), 0, 0, 0),
            // 20 GPU tasks on one GPU worker of two workers (2 threads):
            // dask's target 4 is theirs, not the CPU pool's.
            (demand(4, 20, &[("GPU", 20.0)], 2, 2), 20, 10, 0),
            // CPU tasks only: the default pool's alone.
            (demand(6, 0, &[], 2, 2), 0, 0, 6),
            // Both: 3 GPU tasks, workers of 4 threads (3 tasks: 1 worker).
            (demand(5, 3, &[("GPU", 3.0)], 2, 8), 3, 2, 4),
            // No worker yet: a task a worker.
            (demand(3, 2, &[("GPU", 1.5), ("MEM", 25.0)], 0, 0), 2, 3, 1),
        ];
        for (d, g, t, default) in cases {
            assert_eq!(
                (
                    pool_demand(&gpu, &d),
                    pool_demand(&two, &d),
                    default_demand(&d)
                ),
                (g, t, default),
                "{d:?}"
            );
        }
        // A pool without resources wants nothing of its own.
        assert_eq!(pool_demand(&[], &demand(9, 9, &[("GPU", 9.0)], 1, 1)), 0);
        assert_eq!(
            pool_demand(&[("GPU".into(), 0.0)], &demand(9, 9, &[("GPU", 9.0)], 1, 1)),
            0
        );
    }

    #[test]
    fn a_pools_jobs_are_submitted_with_its_pool_and_counted_by_their_workers() {
        let gpu: PoolName = "gpu".parse().unwrap();
        let rec = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            pool_args(
                Some(&gpu),
                rec(&["--dask-role=worker", "--array=1-4", "--gres=gpu:1"])
            ),
            rec(&["--dask-pool=gpu", "--dask-role=worker", "--gres=gpu:1"])
        );
        // A hand-submitted job's shape ends with its script.
        assert_eq!(
            pool_args(
                Some(&gpu),
                rec(&["--dask-pool=gpu", "--chdir=/w", "/w/job.sh"])
            ),
            rec(&["--dask-pool=gpu", "--chdir=/w", "/w/job.sh"])
        );
        assert_eq!(
            pool_args(None, rec(&["--dask-role=worker", "--mem=3G"])),
            rec(&["--dask-role=worker", "--mem=3G"])
        );
        let jobs = [
            job("7_1", QueueState::Running, None, 0),
            job("7_2", QueueState::Running, None, 0),
        ];
        let w = workers(&[("ana-7_1", "tls://a:1", 0), ("ana-9_1", "tls://b:1", 0)]);
        assert_eq!(connected("ana", &jobs, &w), 1);
    }

    #[test]
    fn refused_batches_are_halved_down_to_one() {
        assert_eq!(batches(10).collect::<Vec<_>>(), [10, 5, 2, 1]);
        assert_eq!(batches(1).collect::<Vec<_>>(), [1]);
        assert_eq!(batches(0).count(), 0);
    }

    #[test]
    fn refusals_back_off() {
        let mut b = Backoff::default();
        assert!(b.allows(0));
        // (asked, got, now) -> (delay reported, short)
        let cases = [
            (4, 0, 100, Some(10), true),
            (4, 0, 110, Some(20), true),
            (4, 0, 130, Some(40), true),
            (4, 2, 170, Some(80), true),
            (2, 0, 250, Some(10), true),
            (2, 2, 260, None, false),
        ];
        for (asked, got, now, delay, short) in cases {
            assert_eq!(
                b.record(asked, got, "limit", now),
                delay,
                "{asked} {got} {now}"
            );
            assert_eq!(b.short.is_some(), short);
            if let Some(d) = delay {
                assert!(!b.allows(now + d - 1) && b.allows(now + d));
            }
        }
        let mut b = Backoff::default();
        for i in 0..20 {
            b.record(1, 0, "x", i * 1000);
        }
        assert_eq!(b.record(1, 0, "x", 99_999), Some(BACKOFF_MAX_S));
        assert_eq!(
            b.short.as_deref(),
            Some("sbatch refused 1 of 1 worker jobs: x")
        );
    }

    #[test]
    fn a_helper_that_keeps_dying_is_started_ever_later() {
        // (deaths before, now) -> delay
        let cases: [(&[u64], u64, u64); 7] = [
            (&[], 100, 1),
            (&[100], 100, 1),
            (&[90, 100], 100, 2),
            (&[80, 90, 95, 100], 100, 8),
            (&[60, 70, 80, 90, 95, 100], 100, 32),
            (&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 10, 60),
            // Deaths over a minute ago do not count.
            (&[10, 20, 100], 130, 1),
        ];
        for (deaths, now, delay) in cases {
            assert_eq!(helper_delay(deaths, now), delay, "{deaths:?}");
        }
    }
}
