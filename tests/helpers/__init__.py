"""What several test modules share: processes started and waited for (``jobs``),
run folders checked (``checks``), run folders and save points made by hand (``runs``), a
fault-injecting S3 proxy (``faultproxy``), lock-taking processes (``lockworker``), image
files of every format (``imagefiles``), and run folders for the inspection commands
(``runfolders``)."""
