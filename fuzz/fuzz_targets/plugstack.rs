//! The plugstack.conf argument parser must return Ok or a one-line error
//! for any input, never panic.
#![no_main]
use dask_spank_common::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match Config::parse(text.split_whitespace()) {
        Ok(c) => {
            // Accepted configurations are consistent: every default lies
            // within its maximum (the five default <= maximum rules).
            let p = &c.policy;
            assert!(p.worker.cpus <= p.worker.cpus_max);
            assert!(p.worker.mem_mb <= p.worker.mem_max_mb);
            assert!(p.scheduler.mem_mb <= p.scheduler.mem_max_mb);
            assert!(p.worker.time_s <= p.worker.time_max_s);
            assert!(p.scheduler.time_s <= p.scheduler.time_max_s);
            // What check-config prints of it is itself accepted, as the
            // same configuration.
            let printed: Vec<String> = c
                .resolved()
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let again = Config::parse(printed.iter().map(String::as_str))
                .unwrap_or_else(|e| panic!("check-config output {printed:?} is refused: {e}"));
            assert_eq!(again, c);
        }
        Err(e) => assert!(!e.to_string().contains('\n')),
    }
});
