//! `scripts/bench`: measures nth against the budgets of the README's Performance section
//! and prints one table. Run it from a release build: the binaries it measures and the
//! emulators it drives are then built as they ship.

mod agent;
mod budgets;
mod cold;
mod drain;
mod function;
mod mass;
mod table;

use table::Table;

/// `scripts/bench [--quick] [--only SECTION]`: SECTION is one of cold, sizes, function,
/// drain, budgets, mass, agent.
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let runs = |section: &str| only.as_deref().is_none_or(|o| o == section);
    let mut table = Table::default();
    if runs("cold") {
        eprintln!("cold start ...");
        cold::measure(&mut table, if quick { 8 } else { 40 }).await?;
    }
    if runs("sizes") {
        eprintln!("sizes ...");
        function::sizes(&mut table)?;
    }
    if runs("function") {
        eprintln!("memory, round trips, API cost ...");
        function::measure(&mut table).await?;
    }
    if runs("drain") {
        eprintln!("drain of a 110-pod node ...");
        drain::measure(&mut table).await?;
    }
    if runs("budgets") {
        eprintln!("budget-limited drain ...");
        budgets::measure(&mut table).await?;
    }
    if runs("mass") {
        eprintln!("mass interruption ...");
        mass::measure(&mut table, if quick { 100 } else { 500 }).await?;
    }
    if runs("agent") {
        eprintln!("cluster agent ...");
        agent::measure(&mut table).await?;
    }
    table.print();
    Ok(())
}
