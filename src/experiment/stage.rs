//! What this module owns: the checks of one training stage's settings that need no spec
//! and no data (its length, learning rate, early stopping, lists that must not be empty),
//! each error naming the key path (`train.stages[1].lr`), the [`GroupCopy`] a stage
//! makes at its start, and the warm start of a run from another run ([`InitFrom`]). The checks against the spec (group and loss names, the shapes of
//! copies) are `train/stages.rs`'s, once the spec is compiled.

use super::{positive, Stage, MAX_EPOCHS};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// `copy: [{from: g, to: h}]`: at the stage's start, every parameter of group `to` takes
/// the values of the parameter of group `from` in the same position (the groups' parameters
/// in declaration order). A per-domain parameter of `to` whose `from` is not per-domain
/// gets the one value in every domain's copy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupCopy {
    pub from: String,
    pub to: String,
}

/// `train.init_from: {run: DIR, copy: [{from: g, to: h}]}`: a fresh run starts with the
/// best parameters (`best.ckpt`) of the run in `DIR` in its groups `h`, each copied from the
/// group `g` of that run as a stage's `copy` does; every other parameter starts from its
/// initialiser.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitFrom {
    pub run: PathBuf,
    pub copy: Vec<GroupCopy>,
}

impl InitFrom {
    pub(super) fn validate(&self) -> Result<(), String> {
        if self.copy.is_empty() {
            return Err("train.init_from.copy: name at least one group to copy ({from: g, to: h})".into());
        }
        Ok(())
    }
}

impl Stage {
    /// Checks the stage at `key` (`train.stages[i]`).
    pub(super) fn validate(&self, key: &str) -> Result<(), String> {
        match (self.epochs, self.steps) {
            (None, None) => return Err(format!("{key}: give its length, `epochs: N` or `steps: N`")),
            (Some(_), Some(_)) => {
                return Err(format!("{key}: give `epochs` or `steps`, not both (a stage has one length)"))
            }
            (Some(0), _) => return Err(format!("{key}.epochs: every stage needs at least one epoch")),
            (Some(e), _) if e > MAX_EPOCHS => {
                return Err(format!("{key}.epochs: must be at most {MAX_EPOCHS}, found {e}"))
            }
            (_, Some(0)) => return Err(format!("{key}.steps: every stage needs at least one step")),
            _ => {}
        }
        if let Some(lr) = self.lr {
            positive(&format!("{key}.lr"), lr)?;
        }
        for (group, &lr) in &self.group_lr {
            positive(&format!("{key}.group_lr.{group}"), lr)?;
        }
        if let Some(early) = &self.early_stopping {
            early.maximize().map_err(|e| e.replacen("train.", &format!("{key}."), 1))?;
        }
        if self.losses.as_ref().is_some_and(|l| l.is_empty()) {
            return Err(format!("{key}.losses: a stage trains on at least one loss (leave the key out for all)"));
        }
        if self.domains.as_ref().is_some_and(|d| d.is_empty()) {
            return Err(format!("{key}.domains: a stage reads at least one domain (leave the key out for all)"));
        }
        Ok(())
    }
}
