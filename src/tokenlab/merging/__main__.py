from tokenlab.merging.cli import main

main()
