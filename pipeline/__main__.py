from pipeline.runner import main

main()
