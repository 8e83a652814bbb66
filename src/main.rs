//! Thin entry point: parse the command line, load the config, set up logging, run, map the result to
//! an exit code (78 for bad config, so systemd does not restart-loop on it).

use std::process::ExitCode;

use clap::Parser;

use hearken::cli::{Cli, Command, RunArgs};
use hearken::config::{self, Config};
use hearken::error::EXIT_CONFIG;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.print_config {
        print!("{}", config::DEFAULT_TOML);
        return ExitCode::SUCCESS;
    }
    let mut command = cli.command.unwrap_or(Command::Run(RunArgs::default()));
    let mut overrides = cli.set.clone();
    // `hearken bench barge-in --set DIR`: a --set value without `=` names the evaluation set.
    if let Command::Bench(b) = &mut command
        && let Some(hearken::cli::BenchCommand::BargeIn { set }) = &mut b.what
        && let Some(i) = overrides.iter().position(|o| !o.contains('='))
    {
        let dir = overrides.remove(i);
        set.get_or_insert(std::path::PathBuf::from(dir));
    }
    if let Command::Run(args) = &command {
        overrides.extend(args.overrides());
    }
    let path = match &cli.config {
        Some(p) => Some(p.clone()),
        None => Some(std::path::PathBuf::from(config::DEFAULT_PATH)).filter(|p| p.exists()),
    };
    let config = match Config::load(path.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hearken: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let mut log = config.log.clone();
    if matches!(command, Command::Demo(_)) && cli.verbose == 0 && log.level == "info" {
        // The demo's output is its timeline on stdout; the info log would only repeat it.
        log.level = "warn".into();
    }
    hearken::telemetry::init(&log, cli.verbose);
    let result = match command {
        Command::CheckConfig => {
            println!("# {} is valid; effective values:", config.origin);
            print!("{}", config.to_toml());
            Ok(())
        }
        Command::Devices => match hearken::audio::cpal::list_devices() {
            Ok(text) => {
                print!("{text}");
                Ok(())
            }
            Err(e) => Err(anyhow::Error::new(e)),
        },
        Command::Bench(args) => hearken::bench::run(&config, &args),
        Command::Run(args) => hearken::service::run_cli(config, &args),
        Command::Demo(args) => hearken::demo::run(
            config,
            &hearken::demo::DemoOptions {
                live: args.live,
                output: args.output,
                echo: !args.no_echo,
                protocol: args.protocol,
            },
        ),
        Command::Agent(args) => hearken::agent::run_cli(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e
                .downcast_ref::<hearken::Error>()
                .map_or(1, hearken::Error::exit_code);
            tracing::error!("{e:#}");
            eprintln!("hearken: {e:#}");
            ExitCode::from(code as u8)
        }
    }
}
