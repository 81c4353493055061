runCasfs()
