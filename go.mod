module github.com/mdcluster/mdcluster

go 1.26
