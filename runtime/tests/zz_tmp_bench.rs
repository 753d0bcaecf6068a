#[test]
fn bench_combine() {
    let (v, d, k) = (1usize << 20, 16usize, 4096 * 26);
    let mut rng = mdl_runtime::exec::SplitMix64::new(1);
    let rows: Vec<u32> = (0..k).map(|_| (rng.next_u64() % (v as u64 / 8)) as u32).collect();
    let vals = vec![0.1f32; k * d];
    let t = Instant::now();
    for _ in 0..20 { let c = combine_duplicate_rows(&rows, &vals, d); std::hint::black_box(&c); }
    println!("combine: {:.3} ms", t.elapsed().as_secs_f64() * 1000.0 / 20.0);
    let t = Instant::now();
    for _ in 0..20 { let mut o: Vec<(u32, usize)> = rows.iter().copied().zip(0..).collect(); o.sort_unstable(); std::hint::black_box(&o); }
    println!("sort only: {:.3} ms", t.elapsed().as_secs_f64() * 1000.0 / 20.0);
}
