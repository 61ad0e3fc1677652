//! Who takes part: users with several devices each, and groups among them.
//! Users are named `u0`, `u1`, ... (new ones keep counting up, so a name is
//! never reused); devices `d0`, `d1`, ... per user.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::device::{Device, DeviceOpts};
use crate::world::{lock, Group, User, World};

/// Add user `name` with `devices` devices, each connecting on its own.
pub fn add_user(
    world: &Arc<World>,
    addr: &str,
    name: &str,
    devices: usize,
    opts: &DeviceOpts,
    rng: &mut StdRng,
) {
    let devices = (0..devices)
        .map(|d| {
            let seed = rng.gen();
            Device::spawn(
                world.clone(),
                addr,
                name,
                &format!("d{d}"),
                opts.clone(),
                StdRng::seed_from_u64(seed),
            )
        })
        .collect();
    lock(&world.users).push(User {
        name: name.to_owned(),
        devices,
        active: true,
    });
}

/// Users `u0..u{n}`.
pub fn add_users(
    world: &Arc<World>,
    addr: &str,
    n: usize,
    devices: usize,
    opts: &DeviceOpts,
    rng: &mut StdRng,
) {
    for u in 0..n {
        add_user(world, addr, &format!("u{u}"), devices, opts, rng);
    }
}

/// Wait until every active device is connected.
pub async fn all_online(world: &World, within: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let offline = lock(&world.users)
            .iter()
            .filter(|u| u.active)
            .flat_map(|u| u.devices.iter())
            .filter(|d| d.client().is_none())
            .count();
        if offline == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("{offline} devices not connected within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Create `n` groups of `size` members (the creator included), each by a
/// random member, and record them with the members the server reports.
pub async fn create_groups(
    world: &World,
    n: usize,
    size: usize,
    rng: &mut StdRng,
) -> anyhow::Result<()> {
    let names: Vec<String> = lock(&world.users)
        .iter()
        .filter(|u| u.active)
        .map(|u| u.name.clone())
        .collect();
    for g in 0..n {
        let members: Vec<&String> = names.choose_multiple(rng, size.min(names.len())).collect();
        let Some((creator, others)) = members.split_first() else {
            bail!("no users to form a group");
        };
        let client = lock(&world.users)
            .iter()
            .find(|u| &&u.name == creator)
            .and_then(|u| u.devices.iter().find_map(|d| d.client()))
            .context("the group's creator is not connected")?;
        let others: Vec<&str> = others.iter().map(|s| s.as_str()).collect();
        let info = client
            .create_group(&format!("g{g}"), &others)
            .await
            .context("create a group")?;
        let mut members: Vec<String> = info.members.iter().map(|m| m.user.clone()).collect();
        members.sort();
        if members.len() != size.min(names.len()) {
            bail!(
                "group {} has {} members, expected {}",
                info.group_id,
                members.len(),
                size
            );
        }
        lock(&world.groups).push(Group {
            id: info.group_id,
            members,
        });
    }
    Ok(())
}
