//! The measurement behind the README's ahash note: std's SipHash against ahash on the
//! daemon's large maps' shape, 64 Vips × 100 Backends of keys like `p12/10.1.12.57` (id
//! assignments, the metrics inventory), each inserted then looked up once, as one
//! reconcile does. `cargo bench -p mlb-benches --bench hashmaps`.

use std::{collections::HashMap, hash::BuildHasher, hint::black_box, time::Instant};

/// Median µs of 31 rounds of inserting and looking up every key.
fn insert_and_lookup<S: BuildHasher + Default>(keys: &[String]) -> f64 {
    let mut times: Vec<f64> = (0..31)
        .map(|_| {
            let started = Instant::now();
            let mut map: HashMap<String, u32, S> = HashMap::default();
            for (i, k) in keys.iter().enumerate() {
                map.insert(k.clone(), i as u32);
            }
            let sum: u64 = keys.iter().map(|k| u64::from(map[k.as_str()])).sum();
            black_box(sum);
            started.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    let keys: Vec<String> = (0..64)
        .flat_map(|v| (0..100).map(move |b| format!("p{v}/10.{}.{v}.{}", 1 + b / 250, 1 + b % 250)))
        .collect();
    let std = insert_and_lookup::<std::collections::hash_map::RandomState>(&keys);
    let ahash = insert_and_lookup::<ahash::RandomState>(&keys);
    println!(
        "{} keys, insert + lookup, median of 31: std SipHash {std:.0} µs, ahash {ahash:.0} µs \
         (CPU: {})",
        keys.len(),
        lb_testbed::bench::cpu_model()
    );
}
