//! `scripts/bench`: measures nth against the budgets of the README's Performance section
//! and prints one table. Run it from a release build: the binaries it measures and the
//! emulators it drives are then built as they ship.

mod agent;
mod cold;
mod drain;
mod function;
mod mass;
mod table;

use table::Table;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let mut table = Table::default();
    eprintln!("cold start ...");
    cold::measure(&mut table, if quick { 8 } else { 40 }).await?;
    eprintln!("sizes ...");
    function::sizes(&mut table)?;
    eprintln!("memory, round trips, API cost ...");
    function::measure(&mut table).await?;
    eprintln!("drain of a 110-pod node ...");
    drain::measure(&mut table).await?;
    eprintln!("mass interruption ...");
    mass::measure(&mut table, if quick { 100 } else { 500 }).await?;
    eprintln!("cluster agent ...");
    agent::measure(&mut table).await?;
    table.print();
    Ok(())
}
