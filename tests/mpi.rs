//! Data-parallel training under `mpirun` (the `mpi` feature; CI installs Open MPI): the
//! collective layer on two real ranks, and `mdl run` on two ranks against one: the ranks'
//! parameters identical at every epoch (and equal to what rank 0 saved), test AUC within
//! 0.001 of one process's with the same global batch, a single rank under `mpirun`
//! byte-identical to a plain run, and `--resume` under `mpirun` byte-identical to an
//! uninterrupted run.
#![cfg(feature = "mpi")]

mod common;

use common::scoring::{mdl_command, ok, tmp};
use mdl::dist::{self, World};
use std::path::Path;
use std::process::{Command, Output};

/// `mpirun -n ranks` of `program args`: allowed as root (CI runs as root), more ranks than
/// cores allowed, and shared-memory transfers without the kernel's cross-memory attach
/// (which containers often forbid).
fn mpirun(ranks: usize, program: &Path, args: &[&str], cwd: &Path) -> Output {
    let mut command = Command::new("mpirun");
    command
        .args(["-n", &ranks.to_string(), "--oversubscribe"])
        .arg(program)
        .args(args)
        .current_dir(cwd)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .env("MDL_CACHE_DIR", Path::new(env!("CARGO_TARGET_TMPDIR")).join("mdl-cache"))
        .env("CI", "1");
    command.output().expect("mpirun (Open MPI's openmpi-bin) must be installed for the mpi feature's tests")
}

/// The collective layer on the ranks of a real `mpirun`: run by [`collectives_on_two_ranks`]
/// (ignored otherwise: alone it would be a group of one).
#[test]
#[ignore = "run under mpirun by collectives_on_two_ranks"]
fn collectives_child() {
    let world = World::init().unwrap();
    let group = world.group();
    let (rank, size) = (group.rank(), group.size());
    assert_eq!(size, 2, "started as one of two ranks");
    // Values whose sum depends on the order: (a + b) on every rank, bit for bit.
    let values =
        |r: usize| -> Vec<f32> { (0..1001).map(|i| ((i * 7 + r * 13) as f32).sin() * 1e-3 + r as f32).collect() };
    let mut data = values(rank);
    dist::all_reduce_sum(group, &mut data).unwrap();
    let expected: Vec<f32> = values(0).iter().zip(values(1)).map(|(a, b)| a + b).collect();
    assert_eq!(
        data.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        expected.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    // An all-gather of different lengths, in rank order.
    let gathered = group.all_gather_u32(&vec![rank as u32 + 10; rank + 1]).unwrap();
    assert_eq!(gathered.values, vec![10, 11, 11]);
    assert_eq!(gathered.starts, vec![0, 1, 3]);
    // Rank 1 fails: both ranks fail, rank 0 with rank 1's message.
    let outcome = dist::agree(group, if rank == 1 { Err("no data".to_string()) } else { Ok(()) });
    assert_eq!(outcome, Err(if rank == 1 { "no data".to_string() } else { "rank 1 failed: no data".to_string() }));
    assert_eq!(dist::agree(group, Ok(rank)), Ok(rank));
    // What rank 0 decides, on both; its error on both.
    assert_eq!(dist::from_leader(group, || Ok(format!("from {rank}"))), Ok("from 0".to_string()));
    let failed = dist::from_leader(group, || Err::<u8, _>("cannot claim".to_string())).unwrap_err();
    assert!(failed.contains("cannot claim"), "{failed}");
    let big = dist::bytes_from_leader(group, || Ok(Some((0..300_000u32).map(|i| i as u8).collect()))).unwrap();
    assert_eq!(big.map(|b| (b.len(), b[299_999])), Some((300_000, (299_999u32 % 256) as u8)));
    assert_eq!(dist::bytes_from_leader(group, || Ok(None)), Ok(None));
    println!("collectives ok on rank {rank}");
}

#[test]
fn collectives_on_two_ranks() {
    let me = std::env::current_exe().unwrap();
    let out = mpirun(
        2,
        &me,
        &["--ignored", "--exact", "collectives_child", "--nocapture", "--test-threads=1"],
        &common::root(),
    );
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the collectives failed under mpirun:\n{text}");
    for rank in 0..2 {
        assert!(text.contains(&format!("collectives ok on rank {rank}")), "rank {rank} did not finish:\n{text}");
    }
}

/// The quickstart's data and settings with a small model ([`common::scoring::SPEC`]: an
/// embedding table, a dense tower) for two epochs (two fingerprint checks).
fn run_args(spec_set: &str, out: &Path) -> Vec<String> {
    let sets = [spec_set, "train.epochs=2", "train.batch_size=2048"];
    let mut args: Vec<String> = ["run", "experiments/quickstart.yaml", "--out"].map(String::from).to_vec();
    args.push(out.display().to_string());
    for set in sets {
        args.extend(["--set".to_string(), set.to_string()]);
    }
    args
}

fn mdl_under_mpirun<S: AsRef<str>>(ranks: usize, args: &[S]) -> String {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let out = mpirun(ranks, Path::new(env!("CARGO_BIN_EXE_mdl")), &args, &common::root());
    ok(&out)
}

fn test_auc(run: &Path) -> f64 {
    let metrics: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("metrics.json")).unwrap()).unwrap();
    metrics["test"]["auc"].as_f64().unwrap()
}

#[test]
fn two_ranks_train_the_model_one_process_trains() {
    let dir = tmp("mpi", "two_ranks");
    let spec = dir.join("scored.mdl");
    std::fs::write(&spec, common::scoring::SPEC).unwrap();
    let spec_set = format!("spec={}", spec.display());
    let (one, single, two) = (dir.join("one"), dir.join("single"), dir.join("two"));
    let args = |out: &Path| run_args(&spec_set, out);
    let plain: Vec<String> = args(&one);
    ok(&mdl_command(&plain.iter().map(String::as_str).collect::<Vec<_>>()).output().unwrap());
    // One rank under mpirun is a plain run: the same metrics.json, byte for byte.
    mdl_under_mpirun(1, &args(&single));
    let metrics = |run: &Path| std::fs::read_to_string(run.join("metrics.json")).unwrap();
    assert_eq!(metrics(&single), metrics(&one));

    mdl_under_mpirun(2, &args(&two));
    let log = std::fs::read_to_string(two.join("train.log")).unwrap();
    assert!(log.contains("data-parallel: 2 ranks"), "{log}");
    // The ranks' fingerprints agreed at the end of both epochs ...
    let checks: Vec<(u64, String)> = log
        .lines()
        .filter_map(|l| {
            let rest = l.split("] step ").nth(1)?;
            let (step, rest) = rest.split_once(' ')?;
            let hash = rest.split("parameters identical on all 2 ranks (fingerprint ").nth(1)?.trim_end_matches(')');
            Some((step.parse().ok()?, hash.to_string()))
        })
        .collect();
    assert_eq!(checks.len(), 2, "a fingerprint check per epoch:\n{log}");
    // ... and the best parameters rank 0 saved are the ones all ranks held at that step.
    let best_step = serde_json::from_str::<serde_json::Value>(&metrics(&two)).unwrap()["best_step"].as_u64().unwrap();
    let best = mdl::train::load_run(&two).unwrap();
    let (_, logged) = checks.iter().find(|(step, _)| *step == best_step).expect("the best step is an epoch's end");
    assert_eq!(format!("{:016x}", mdl::dist::exchange::params_hash(&best.params)), *logged);
    // The same global batches: the same model up to the order of float sums.
    let (auc_one, auc_two) = (test_auc(&one), test_auc(&two));
    assert!((auc_one - auc_two).abs() < 1e-3, "test AUC: one process {auc_one}, two ranks {auc_two}");
    let timing: serde_json::Value = serde_json::from_slice(&std::fs::read(two.join("timing.json")).unwrap()).unwrap();
    assert_eq!(timing["data_parallel"]["ranks"], 2);

    // Stopped part-way and resumed under mpirun: the same run, byte for byte.
    let resumed = dir.join("resumed");
    let resumed_out = resumed.to_str().unwrap();
    let stopped = [args(&resumed), vec!["--stop-after".to_string(), "80".to_string()]].concat();
    mdl_under_mpirun(2, &stopped);
    assert!(!resumed.join("metrics.json").exists());
    let err = mdl_under_mpirun(2, &["run", "--resume", resumed_out]);
    assert!(err.contains("resumed from"), "{err}");
    assert_eq!(metrics(&resumed), metrics(&two));
}
