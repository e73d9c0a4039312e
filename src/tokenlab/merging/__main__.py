from tokenlab.merging.config import main

main()
