from tokenlab.tour.report import main

main()
