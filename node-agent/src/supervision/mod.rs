//! Keeping the jobs' processes: the nanny loop ([`supervisor`]) with its
//! restart rules ([`restart`]) and memory watchdog ([`memwatch`]), the job
//! table ([`jobs`]) and the agent's shared state ([`agent`]), admission
//! against the policy and Slurm ([`admission`], [`slurm`]), adopting the
//! jobs of a previous agent ([`recovery`]) and the metrics ([`metrics`]).
//! Uses `spawning` and `system`.

pub mod admission;
pub mod agent;
pub mod jobs;
pub mod memwatch;
pub mod metrics;
pub mod recovery;
pub mod restart;
pub mod slurm;
pub mod supervisor;
