from nanoctl.cli.main import run

run()
