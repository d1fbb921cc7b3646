"""``python -m lit_td3 fit|validate ... --config configs/td3.yaml``: see ``lit_td3.cli``."""

from lit_td3.cli import main

if __name__ == "__main__":  # env worker processes (forkserver) import this module again: they must not run the CLI
    main()
