from immunoprofile.cli import main

main()
